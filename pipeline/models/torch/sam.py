"""The ``sam`` segmenter: Segment Anything masks from point and box prompts in world coordinates.

Prompts are given in lon/lat or any CRS (rasters) or patient mm (volumes) and mapped to pixels
through the image geometry (:mod:`pipeline.models.prompts`). Each prompt gets a ``window`` of
pixels centred on it (shifted to stay inside the image), so a prompt near a seam is still centred
in what the model sees. On volumes SAM works in 2-D: a point prompt is segmented in its axial
slice, a box prompt in every axial slice its z range covers.

Stitching is exact by construction (merge policy ``none``): the halo is ``window - 1`` in-plane,
so every block whose core meets a prompt's window holds the whole window and computes the same
mask from the same pixels. Masks become global ids ``prompt number + 1`` (0-based number); where
two masks overlap, the higher predicted IoU wins, then the lower prompt number; a prompt never
labels pixels outside its window. The tiled result therefore equals the untiled one.

Weights are the user's: ``checkpoint`` is a path to an official SAM checkpoint (nothing is
downloaded). ``checkpoint: random`` builds a randomly initialised network for plumbing tests;
the ``tiny_test`` variant is a very small SAM for those tests only. Masks from random weights
are meaningless: quality needs the real checkpoints. The network is loaded once per worker
process; torch and segment_anything are imported lazily.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pipeline.errors import ConfigError
from pipeline.models.base import ImageInfo, MergePolicy, Segmenter, SegmenterParams, register
from pipeline.models.classical.threshold import resolve_band
from pipeline.models.prompts import MappedPrompt, Prompt, PromptMask, map_prompts, paste_masks
from pipeline.models.torch import runtime
from pipeline.tiling import BlockContext, Box

log = logging.getLogger(__name__)

Variant = Literal["vit_b", "vit_l", "vit_h", "tiny_test"]
#: Official checkpoint file names (download them yourself from ``CHECKPOINT_URL``).
CHECKPOINT_FILES = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
#: Width of the image encoder of each variant (checked against the checkpoint before a run).
ENCODER_WIDTH = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280, "tiny_test": 32}
RANDOM = "random"
#: Networks loaded in this process, by (checkpoint, variant, device), and load counts (for tests).
_MODELS: dict[tuple[str, str, str], Any] = {}
LOADS: dict[tuple[str, str, str], int] = {}
#: Recent prompt masks in this process (a window met by several chunks is computed once per worker).
_RESULTS: OrderedDict[tuple[Any, ...], tuple[np.ndarray, float]] = OrderedDict()
RESULTS_KEPT = 64
_SHA: dict[tuple[str, int, float], str] = {}


class SamParams(SegmenterParams):
    checkpoint: str | None = Field(
        None, description="path to the SAM .pth/.safetensors you downloaded; 'random': untrained (tests)"
    )
    variant: Variant = Field("vit_b", description="vit_b, vit_l, vit_h, or tiny_test (random, tests only)")
    prompts: list[Prompt] = Field(min_length=1, description="points and boxes in prompts_crs")
    prompts_crs: str | None = Field(
        None,
        description="rasters: 'EPSG:4326' (lon, lat; default) or any CRS; volumes: 'LPS' (default), 'RAS'",
    )
    window: int = Field(512, ge=16, description="side of the crop given to SAM around each prompt, in pixels")
    multimask: bool = Field(True, description="ask SAM for 3 masks and keep the one of highest predicted IoU")
    mask_threshold: float = Field(0.0, description="mask logit above which a pixel belongs to the mask")
    bands: list[int | str] | None = Field(
        None, description="1 or 3 bands fed as RGB (default the first 3, or band 1 repeated)"
    )
    value_range: tuple[float, float] | None = Field(
        None, description="values mapped to 0..255 (e.g. a CT window); default: uint8 as is, else 2-98 %"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"


@register
class SamSegmenter(Segmenter):
    """Segment Anything masks for world-coordinate prompts, one global id per prompt."""

    name = "sam"
    kind = "instance"
    merge: ClassVar[MergePolicy] = "none"
    summary = "Segment Anything (your checkpoint) from point/box prompts in lon/lat, CRS or patient mm"
    Params: ClassVar[type[SegmenterParams]] = SamParams
    params: SamParams
    uses_context: ClassVar[bool] = True
    uses_torch: ClassVar[bool] = True
    halo_rule: ClassVar[str] = "window - 1 in-plane (0 along z: volumes are segmented per axial slice)"

    def __init__(self, params: SegmenterParams, info: ImageInfo) -> None:
        super().__init__(params, info)
        self.checkpoint = check_checkpoint(self.params.checkpoint, self.params.variant)
        default_crs = "EPSG:4326" if info.kind == "raster" else "LPS"
        self.crs = self.params.prompts_crs or default_crs
        self.prompts: list[MappedPrompt] = map_prompts(
            self.params.prompts, info.geometry, info.shape, crs=self.crs, window=self.params.window
        )
        self.bands = self._bands()

    def _bands(self) -> list[int]:
        chosen = self.params.bands
        if chosen is None:
            return [0, 1, 2] if self.info.n_channels >= 3 else [0]
        if len(chosen) not in (1, 3):
            raise ConfigError(f"segmenter.params.bands {chosen}: give 1 band (repeated as RGB) or 3 bands")
        return [resolve_band(b, self.info, where="segmenter.params.bands") for b in chosen]

    # -- declared facts -------------------------------------------------------------------
    @property
    def halo(self) -> Any:
        """``window - 1`` per in-plane axis (at most the image), 0 along z."""
        inplane = tuple(min(self.params.window, n) - 1 for n in self.info.shape[-2:])
        return inplane if self.info.spatial_ndim == 2 else (0, *inplane)

    @property
    def classes(self) -> dict[int, str]:
        return {0: "background", 1: "object"}

    @property
    def identity(self) -> dict[str, str]:
        """Variant and checkpoint checksum, for the job fingerprint (new weights: new results)."""
        sha = RANDOM if self.checkpoint == RANDOM else _sha256(Path(self.checkpoint))
        return {"name": f"sam-{self.params.variant}", "weights_sha256": sha}

    def fitted_values(self) -> dict[str, Any]:
        """Where each prompt landed (index and window) and the prompts' CRS, for the job summary."""
        return {"prompts_crs": self.crs, "prompts": [p.to_json() for p in self.prompts]}

    # -- inference ------------------------------------------------------------------------
    def __call__(self, block: np.ndarray, valid: np.ndarray, ctx: BlockContext | None = None) -> np.ndarray:
        spatial = block.shape[1:]
        origin = tuple(ctx.origin) if ctx is not None else (0,) * len(spatial)
        here = Box(origin, tuple(o + s for o, s in zip(origin, spatial, strict=True)))
        masks = []
        for p in self.prompts:
            # With halo >= window - 1, a window that meets this block's core lies whole in it;
            # a window only partly in the block meets nothing but its halo (cropped anyway).
            for win in _slices(p.window, here):
                if here.contains(win):
                    masks.append(self._mask(p, win, block, valid, here))
        return paste_masks(spatial, origin, masks)

    def _mask(self, p: MappedPrompt, win: Box, block: np.ndarray, valid: np.ndarray, here: Box) -> PromptMask:
        local = win.relative_to(here).slices()
        v = valid[local].reshape(win.shape[-2:])
        bands = block[self.bands][(slice(None), *local)]
        rgb = to_rgb8(bands.reshape(len(self.bands), *win.shape[-2:]), v, self)
        prompt = _local_prompt(p, win)
        digest = hashlib.blake2b(rgb.tobytes() + v.tobytes(), digest_size=16).hexdigest()
        params = (self.params.variant, self.params.multimask, self.params.mask_threshold)
        key = (self.checkpoint, *params, tuple(prompt[1]), digest)
        hit = _RESULTS.get(key)
        if hit is None:
            hit = self._predict(rgb, prompt)
            _RESULTS[key] = hit
            while len(_RESULTS) > RESULTS_KEPT:
                _RESULTS.popitem(last=False)
        mask, score = hit
        return PromptMask(p.label, win, mask & v, score)

    def _predict(self, rgb: np.ndarray, prompt: tuple[str, list[float]]) -> tuple[np.ndarray, float]:
        from segment_anything import SamPredictor

        predictor = SamPredictor(self._network())  # a light wrapper holding this window's embedding
        predictor.set_image(rgb)
        kind, coords = prompt
        if kind == "point":
            out = predictor.predict(
                point_coords=np.array([coords], np.float32),
                point_labels=np.array([1]),
                multimask_output=self.params.multimask,
                return_logits=True,
            )
        else:
            out = predictor.predict(
                box=np.array(coords, np.float32), multimask_output=self.params.multimask, return_logits=True
            )
        logits, scores = np.asarray(out[0]), np.asarray(out[1])
        best = int(np.argmax(scores))
        return logits[best] > self.params.mask_threshold, float(scores[best])

    def _network(self) -> Any:
        device = runtime.device_for(self.params.device)
        key = (self.checkpoint, self.params.variant, device)
        net = _MODELS.get(key)
        if net is None:
            net = build_sam(self.params.variant, self.checkpoint).to(device).eval()
            _MODELS[key] = net
            LOADS[key] = LOADS.get(key, 0) + 1
        return net


def _slices(window: Box, here: Box) -> list[Box]:
    """The window itself (rasters) or its one-slice windows in this block's z range (volumes)."""
    if window.ndim == 2:
        return [window]
    z0, z1 = max(window.start[0], here.start[0]), min(window.stop[0], here.stop[0])
    return [Box((z, *window.start[1:]), (z + 1, *window.stop[1:])) for z in range(z0, z1)]


def _local_prompt(p: MappedPrompt, win: Box) -> tuple[str, list[float]]:
    """The prompt in SAM's window frame: a point (x, y) or a box (x0, y0, x1, y1), pixel indices."""
    (r0, c0), (r1, c1) = p.region.start[-2:], p.region.stop[-2:]
    wy, wx = win.start[-2:]
    if p.kind == "point":
        return "point", [float(c0 - wx), float(r0 - wy)]
    return "box", [float(c0 - wx), float(r0 - wy), float(c1 - 1 - wx), float(r1 - 1 - wy)]


def to_rgb8(x: np.ndarray, valid: np.ndarray, seg: SamSegmenter) -> np.ndarray:
    """Bands ``(1 or 3, h, w)`` -> ``(h, w, 3)`` uint8 as SAM expects; invalid pixels 0.

    ``value_range`` maps linearly to 0..255; without it uint8 passes as is and other types are
    stretched between the window's 2nd and 98th percentiles (the same window, the same result).
    """
    rng = seg.params.value_range
    if rng is None and x.dtype == np.uint8:
        out = x.copy()
    else:
        if rng is None:
            vals = x[:, valid]
            rng = tuple(np.percentile(vals, [2, 98]).tolist()) if vals.size else (0.0, 1.0)
        lo, hi = float(rng[0]), float(rng[1])
        scaled = (x.astype(np.float64) - lo) / (hi - lo if hi > lo else 1.0)
        out = np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    out[:, ~valid] = 0
    if out.shape[0] == 1:
        out = np.repeat(out, 3, axis=0)
    return np.ascontiguousarray(out.transpose(1, 2, 0))


# -- checkpoints and networks ----------------------------------------------------------------
def check_checkpoint(checkpoint: str | None, variant: str) -> str:
    """The checkpoint path (resolved) or ``'random'``; ConfigError naming the expected file."""
    if checkpoint == RANDOM:
        log.warning("segmenter sam: random %s weights; the masks are meaningless (plumbing only)", variant)
        return RANDOM
    if variant == "tiny_test" and checkpoint is None:
        raise ConfigError(
            "segmenter.params.checkpoint: variant tiny_test is a tiny test network with no published "
            "weights; use checkpoint: random (or a state dict you saved from it)"
        )
    expected = CHECKPOINT_FILES.get(variant, "a state dict of the tiny_test network")
    how = (
        f"download it yourself from {CHECKPOINT_URL}{expected} (segpipe downloads nothing) and set "
        "segmenter.params.checkpoint to its path"
    )
    if checkpoint is None:
        raise ConfigError(
            f"segmenter sam needs segmenter.params.checkpoint: the SAM {variant} file {expected}; {how}"
        )
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"segmenter.params.checkpoint {str(path)!r}: file not found; "
            f"SAM {variant} expects {expected}; {how}"
        )
    _check_width(path, variant)
    return str(path.resolve())


def _check_width(path: Path, variant: str) -> None:
    """Refuse a checkpoint of another variant before any chunk runs (reads one tensor's shape)."""
    width = _encoder_width(path)
    if width is not None and width != ENCODER_WIDTH[variant]:
        other = [v for v, w in ENCODER_WIDTH.items() if w == width]
        raise ConfigError(
            f"segmenter.params.checkpoint {str(path)!r}: its image encoder is {width} wide, a "
            f"{other[0] if other else 'different'} checkpoint, but variant is {variant!r} "
            f"({ENCODER_WIDTH[variant]} wide); set segmenter.params.variant to match the file"
        )


def _encoder_width(path: Path) -> int | None:
    key = "image_encoder.patch_embed.proj.weight"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return int(f.get_slice(key).get_shape()[0]) if key in f.keys() else None  # noqa: SIM118
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        log.debug("%s: shape check skipped (%s)", path, e)
        return None
    tensor = state.get(key) if isinstance(state, dict) else None
    return int(tensor.shape[0]) if tensor is not None else None


def build_sam(variant: str, checkpoint: str) -> Any:
    """A SAM network of ``variant`` with the checkpoint's weights (``'random'``: seeded random)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same random network in every worker process
        net = _tiny_sam() if variant == "tiny_test" else _official(variant)
    if checkpoint != RANDOM:
        from pipeline.models.torch.weights import load_weights

        try:
            net.load_state_dict(load_weights(checkpoint))
        except RuntimeError as e:
            raise ConfigError(
                f"segmenter.params.checkpoint {checkpoint!r} does not fit SAM {variant} ({str(e)[:300]}); "
                "set segmenter.params.variant to the checkpoint's variant"
            ) from None
    return net.eval()


def _official(variant: str) -> Any:
    from segment_anything import sam_model_registry

    return sam_model_registry[variant](checkpoint=None)  # weights are loaded safely by build_sam


def _tiny_sam() -> Any:
    """A SAM a few hundred kB in size (img 128, 2-block ViT of width 32): for plumbing tests only."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    img, patch, dim = 128, 16, 32
    encoder = ImageEncoderViT(
        img_size=img,
        patch_size=patch,
        embed_dim=ENCODER_WIDTH["tiny_test"],
        depth=2,
        num_heads=2,
        mlp_ratio=2,
        out_chans=dim,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=(1,),
    )
    prompts = PromptEncoder(
        embed_dim=dim, image_embedding_size=(img // patch,) * 2, input_image_size=(img, img), mask_in_chans=4
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
        transformer_dim=dim,
        iou_head_depth=2,
        iou_head_hidden_dim=32,
    )
    return Sam(
        encoder, prompts, decoder, pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]
    )


def _sha256(path: Path) -> str:
    from pipeline.models.torch.card import sha256_of

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime)
    if key not in _SHA:
        _SHA[key] = sha256_of(path)
    return _SHA[key]
