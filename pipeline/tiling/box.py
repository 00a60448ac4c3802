"""Axis-aligned integer boxes ``[start, stop)`` in any number of dimensions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """A half-open integer region ``[start, stop)`` per axis."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", tuple(int(v) for v in self.start))
        object.__setattr__(self, "stop", tuple(int(v) for v in self.stop))
        if len(self.start) != len(self.stop):
            raise ValueError(f"Box start {self.start} and stop {self.stop} differ in length")
        if any(b < a for a, b in zip(self.start, self.stop, strict=True)):
            raise ValueError(f"Box stop {self.stop} is before start {self.start}")

    @classmethod
    def from_shape(cls, shape: tuple[int, ...]) -> Box:
        """The box covering an array of ``shape``."""
        return cls((0,) * len(shape), tuple(shape))

    @property
    def ndim(self) -> int:
        """Number of axes."""
        return len(self.start)

    @property
    def shape(self) -> tuple[int, ...]:
        """Extent per axis."""
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    @property
    def size(self) -> int:
        """Number of elements."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    def slices(self) -> tuple[slice, ...]:
        """The box as numpy slices."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    def grow(self, margin: tuple[int, ...]) -> Box:
        """The box enlarged by ``margin`` on every side (not clipped)."""
        return Box(
            tuple(a - m for a, m in zip(self.start, margin, strict=True)),
            tuple(b + m for b, m in zip(self.stop, margin, strict=True)),
        )

    def intersect(self, other: Box) -> Box:
        """The overlap of two boxes (empty boxes keep ``stop == start``)."""
        start = tuple(max(a, b) for a, b in zip(self.start, other.start, strict=True))
        stop = tuple(max(s, min(a, b)) for s, a, b in zip(start, self.stop, other.stop, strict=True))
        return Box(start, stop)

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of ``outer`` (whose start becomes the origin)."""
        return Box(
            tuple(a - o for a, o in zip(self.start, outer.start, strict=True)),
            tuple(b - o for b, o in zip(self.stop, outer.start, strict=True)),
        )

    def contains(self, other: Box) -> bool:
        """Whether ``other`` lies entirely inside this box."""
        return all(
            a <= c and d <= b
            for a, b, c, d in zip(self.start, self.stop, other.start, other.stop, strict=True)
        )
