"""Frames to the page: scaled-down JPEG thumbnails with the heat map blended over them (never raw arrays)."""
from __future__ import annotations

import numpy as np

from mrkd.core.images import to_rgb
from mrkd.runtime.visualize import overlay

from ..inspection import encode_image


def thumbnail_jpeg(image: np.ndarray, anomaly_map: np.ndarray | None, width: int = 320, quality: int = 80) -> bytes:
    """The frame scaled down to at most `width` pixels wide (area averaging), the normalised anomaly map (jet
    colours) blended over it when there is one, as JPEG bytes."""
    import cv2

    rgb = to_rgb(image)
    height, frame_width = rgb.shape[:2]
    if frame_width > width:
        size = (width, max(1, round(height * width / frame_width)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    if anomaly_map is not None:
        rgb = overlay(rgb, anomaly_map)
    return encode_image(rgb, "jpeg", quality)
