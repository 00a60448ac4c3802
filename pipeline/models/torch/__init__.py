"""Learned segmenters (torch): weight loading; networks and inference come with the U-Net work."""
