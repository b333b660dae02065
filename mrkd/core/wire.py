"""The wire contract between the served models and their clients: names, data types and shapes of the tensors, the
model names of a product, how ANOMALY_MAP is encoded, the files of a version folder, and the statuses of a result.

Both sides import this module: mrkd.triton (config rendering, the python-backend models) and the client (requests,
decoding answers). It needs numpy only, never torch or tritonserver, so a client imports it without either.
"""
from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------------------- tensors

INPUT_IMAGE = "IMAGE"  # the ensemble NAME: TYPE_STRING [1], one encoded JPEG/PNG/BMP per batch item
INPUT_FRAME = "FRAME"  # the ensemble NAME_raw: UINT8 [H, W, 3], decoded frames
PREPARED = "PREPARED"  # between the steps: uint8 [3, S, S]
RAW_MAP = "RAW_MAP"  # between the steps: float32 [M, M], the raw (uncalibrated) anomaly map
OUTPUT_SCORE = "SCORE"  # FP32 [1], normalised: 0.5 is the threshold, clipped to [0, 1]
OUTPUT_RAW_SCORE = "RAW_SCORE"  # FP32 [1], the max of the raw anomaly map
OUTPUT_IS_ANOMALOUS = "IS_ANOMALOUS"  # BOOL [1]
OUTPUT_ANOMALY_MAP = "ANOMALY_MAP"  # [M, M], FP16 or UINT8 (255 = 1.0)

# Triton's data types (config.pbtxt) and the client's (tritonclient InferInput) of the two inputs.
IMAGE_CONFIG_TYPE, IMAGE_CLIENT_TYPE = "TYPE_STRING", "BYTES"
FRAME_CONFIG_TYPE, FRAME_CLIENT_TYPE = "TYPE_UINT8", "UINT8"

# ANOMALY_MAP's encodings: option value -> numpy dtype, and -> Triton data type.
MAP_DTYPES = {"fp16": np.float16, "uint8": np.uint8}
MAP_CONFIG_TYPES = {"fp16": "TYPE_FP16", "uint8": "TYPE_UINT8"}

# ---------------------------------------------------------------------------------------------------------- models

DEFAULT_NAME = "mrkd"  # the default product name
ROLES = ("ensemble", "raw_ensemble", "preprocess", "frame_preprocess", "detector", "postprocess")
ROLE_SUFFIX = {
    "ensemble": "",
    "raw_ensemble": "_raw",
    "preprocess": "_preprocess",
    "frame_preprocess": "_frame_preprocess",
    "detector": "_detector",
    "postprocess": "_postprocess",
}
RAW_MODEL_SUFFIX = ROLE_SUFFIX["raw_ensemble"]  # product NAME answers decoded frames as NAME_raw


def model_names(name: str) -> dict[str, str]:
    """Product name -> {role: Triton model name}."""
    return {role: f"{name}{ROLE_SUFFIX[role]}" for role in ROLES}


# ---------------------------------------------------------------------------------------------------------- files

CHECKPOINT_FILE = "checkpoint.pt"  # a training run's folder and the detector's version folder
CALIBRATION_FILE = "calibration.json"  # the postprocess model's version folder

# ---------------------------------------------------------------------------------------------------------- results

STATUS_OK = "ok"  # answered with a finite score
STATUS_INVALID_SCORE = "invalid_score"  # answered, but the score is not a number: recorded as anomalous


# ---------------------------------------------------------------------------------------------------------- maps


def encode_map(normalized: np.ndarray, map_dtype: str) -> np.ndarray:
    """Normalised maps in [0, 1] -> FP16, or UINT8 with 255 = 1.0 (what the ensemble returns as ANOMALY_MAP)."""
    if map_dtype == "fp16":
        return normalized.astype(np.float16)
    if map_dtype == "uint8":  # a NaN pixel (a bad feature value) is as anomalous as it gets: 255
        return np.rint(np.clip(np.nan_to_num(normalized, nan=1.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"map_dtype must be one of {sorted(MAP_DTYPES)}, got {map_dtype!r}")


def decode_map(encoded: np.ndarray) -> np.ndarray:
    """ANOMALY_MAP as received by a client (FP16 or UINT8, any leading batch dimensions of size 1 included) ->
    float32 normalised map in [0, 1]."""
    array = np.asarray(encoded)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)
