"""Frame sources for the cameras: image folders, video files, network streams and synthetic frames.

Every source yields `Frame`s (RGB uint8 H x W x 3, numbered from 0 in the order they were read). A source is
*live* when it produces frames at its own pace (a stream, or anything paced with `fps`): when the server cannot keep
up, a live camera's frames are dropped by the queue's policy. A source that is not live (a folder or a video file
read as fast as possible) is simply read more slowly when the queue is full: nothing is dropped.

A stream that stops delivering frames is reopened with backoff (0.5 s, 1 s, 2 s, ... up to 10 s between attempts)
when `SourceOptions.reconnect` allows attempts (the CLI's --reconnect N); `read()` then yields `SourceEvent`s
besides frames: "reconnecting" when the stream is lost, "gap" when it is back (with how long it was away). A
stream that cannot be brought back (or with reconnect 0) raises SourceError saying why: that camera gave up.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from mrkd.core.files import user_path
from mrkd.core.images import InvalidImageError, load_image, to_rgb

from .redact import redact

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://")
TEXTURES = ("brick", "grass", "gravel")


class SourceError(ValueError):
    """A camera source that cannot be opened or read: missing folder, no images, unreadable video, bad spec."""


@dataclass
class Frame:
    """One frame as read from a camera."""

    camera: str
    index: int
    source_name: str
    capture_time: float  # seconds since the epoch, when the frame was read
    image: np.ndarray | None  # H x W x 3 uint8 RGB; None when the frame could not be read
    read_error: str = ""  # why the frame could not be read (an unreadable file in a folder)
    read_at: float = field(default_factory=time.monotonic)  # monotonic clock, when the frame was read

    @property
    def capture_time_iso(self) -> str:
        return datetime.fromtimestamp(self.capture_time, tz=timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class SourceOptions:
    loop: bool = False  # replay folders, video files and synthetic sequences forever (until stopped)
    fps: float | None = None  # pace frames at this rate; None = as fast as they can be read (streams: their rate)
    reconnect: int = 0  # attempts to reopen a lost stream before the camera gives up (0: give up at once)
    reconnect_delay: float = 0.5  # seconds before the first attempt; doubled after each failed one
    reconnect_max_delay: float = 10.0
    max_read_errors: int = 100  # consecutive unreadable frames before the camera gives up (one bad file is a line)


@dataclass
class SourceEvent:
    """Not a frame: something that happened to the source. kind "reconnecting": the stream was lost (reason);
    kind "gap": it is back after `seconds` and `attempts` reopen attempts (started: when it was lost, epoch s)."""

    kind: str
    started: float
    reason: str
    seconds: float = 0.0
    attempts: int = 0

    @property
    def started_iso(self) -> str:
        return datetime.fromtimestamp(self.started, tz=timezone.utc).isoformat(timespec="milliseconds")


class FrameSource:
    """Base class: `frames()` yields (source name, RGB image or the read error) pairs, and possibly SourceEvents;
    `read()` numbers and paces the frames."""

    live: bool = False
    description: str = ""

    def __init__(self, options: SourceOptions):
        if options.fps is not None and options.fps <= 0:
            raise SourceError(f"--fps must be positive, got {options.fps}")
        if options.reconnect < 0:
            raise SourceError(f"--reconnect must not be negative, got {options.reconnect}")
        if options.max_read_errors < 1:
            raise SourceError(f"max_read_errors must be at least 1, got {options.max_read_errors}")
        self.options = options
        self.live = self.live or options.fps is not None
        self._stop = threading.Event()  # read()'s stop event: ends waits inside frames() (reconnect backoff)

    def frames(self) -> Iterator[tuple[str, np.ndarray | InvalidImageError] | SourceEvent]:
        raise NotImplementedError

    def read(self, camera: str, stop: threading.Event | None = None) -> Iterator[Frame | SourceEvent]:
        """Numbered frames, paced at `options.fps` if set, and the source's events; ends when the source ends or
        `stop` is set; raises SourceError when the source gives up."""
        stop = stop or threading.Event()
        self._stop = stop
        period = 1.0 / self.options.fps if self.options.fps else 0.0
        next_due = time.monotonic()
        index = 0
        failed_in_a_row = 0
        for item in self.frames():
            if isinstance(item, SourceEvent):
                yield item
                continue
            name, image = item
            if period:
                # Sleep on the event so that a stop is seen at once; the schedule does not drift.
                if stop.wait(max(0.0, next_due - time.monotonic())):
                    return
                next_due += period
                if next_due < time.monotonic() - period:  # fell behind (slow reads): restart the schedule
                    next_due = time.monotonic()
            if stop.is_set():
                return
            if isinstance(image, Exception):
                failed_in_a_row += 1
                if failed_in_a_row > self.options.max_read_errors:
                    raise SourceError(f"gave up after {self.options.max_read_errors} unreadable frames in a row "
                                      f"(last: {redact(str(image))})")
                yield Frame(camera, index, name, time.time(), None, read_error=redact(str(image)))
            else:
                failed_in_a_row = 0
                yield Frame(camera, index, name, time.time(), image)
            index += 1

    def close(self) -> None:
        pass


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder (not recursive), in name order; raises SourceError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SourceError(f"no images in {folder} (looked for files ending in {', '.join(IMAGE_SUFFIXES)})")
    return paths


class FolderSource(FrameSource):
    """The image files of a folder (not recursive), in name order; once, or forever with `loop`."""

    def __init__(self, folder: str | Path, options: SourceOptions):
        super().__init__(options)
        self.folder = Path(folder)
        self.paths = image_files(self.folder)
        self.description = f"folder {self.folder} ({len(self.paths)} images)"

    def frames(self) -> Iterator[tuple[str, np.ndarray | InvalidImageError]]:
        while True:
            for path in self.paths:
                try:
                    image: np.ndarray | Exception = load_image(path)
                except InvalidImageError as exc:  # one bad file is recorded as that frame's error, not fatal
                    image = exc
                except OSError as exc:  # a file gone, or no file descriptor left: that frame's error, not fatal
                    image = InvalidImageError(f"cannot read {path.name}: {type(exc).__name__}: {exc.strerror or exc}")
                yield path.name, image
            if not self.options.loop:
                return


class VideoSource(FrameSource):
    """A video file or a network stream, read with OpenCV. Streams are live (paced by the camera)."""

    def __init__(self, location: str, options: SourceOptions):
        import cv2

        self.is_stream = location.lower().startswith(STREAM_SCHEMES)
        self.live = self.is_stream
        super().__init__(options)
        if not self.is_stream:
            location = str(user_path(location))
        if not self.is_stream and not Path(location).is_file():
            raise SourceError(f"video file not found: {location}")
        self.location = location
        self._cv2 = cv2
        self._capture = self._open()
        kind = "stream" if self.is_stream else "video"
        self.shown_location = redact(location)  # what is written or shown: never the stream's credentials
        self.description = f"{kind} {self.shown_location}"
        self._label = self.shown_location if self.is_stream else Path(location).name

    def _open(self):
        capture = self._cv2.VideoCapture(self.location)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"OpenCV cannot open {redact(self.location)} (missing codec, wrong URL, or not a "
                              "video)")
        return capture

    def frames(self) -> Iterator[tuple[str, np.ndarray | InvalidImageError] | SourceEvent]:
        position = 0
        attempts_used = 0  # reconnect attempts since the last frame read (a stream that comes back empty counts)
        while not self._stop.is_set():
            ok, bgr = self._capture.read() if self._capture is not None else (False, None)
            if not ok:
                if not self.is_stream:
                    if self.options.loop and position > 0:
                        self._capture.release()
                        self._capture = self._open()
                        position = 0
                        continue
                    return  # the end of a video file
                attempts_used = yield from self._reconnect(attempts_used)
                continue
            attempts_used = 0
            yield f"{self._label}#{position}", to_rgb(np.ascontiguousarray(bgr[:, :, ::-1]))
            position += 1

    def _reconnect(self, attempts_used: int) -> Iterator[SourceEvent]:
        """The stream stopped delivering frames: reopen it with backoff; returns the attempts used so far, or
        raises SourceError (the camera gives up) when `options.reconnect` attempts did not bring it back."""
        reason = "the stream stopped delivering frames"
        lost_at, lost_wall = time.monotonic(), time.time()
        allowed = self.options.reconnect
        if attempts_used >= allowed:
            detail = "--reconnect is 0" if allowed == 0 else f"gave up after {allowed} reconnect attempts"
            raise SourceError(f"stream {redact(self.location)} lost ({reason}); {detail}")
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        yield SourceEvent("reconnecting", lost_wall, reason)
        delay = self.options.reconnect_delay
        last_error = reason
        while attempts_used < allowed:
            if self._stop.wait(delay):
                return attempts_used  # stopping: frames() ends
            attempts_used += 1
            try:
                self._capture = self._open()
            except SourceError as exc:
                last_error = str(exc)
                delay = min(delay * 2, self.options.reconnect_max_delay)
                continue
            yield SourceEvent("gap", lost_wall, reason, seconds=time.monotonic() - lost_at, attempts=attempts_used)
            return attempts_used
        raise SourceError(f"stream {redact(self.location)} lost ({reason}); gave up after {allowed} reconnect "
                          f"attempts over {time.monotonic() - lost_at:.1f} s (last error: {last_error})")

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()


@dataclass
class SyntheticSpec:
    texture: str = "brick"
    size: int = 256
    count: int = 100
    defect_every: int = 4  # every k-th frame gets a pasted patch of another texture; 0 = never
    seed: int = 0
    extra: dict[str, str] = field(default_factory=dict)


class SyntheticSource(FrameSource):
    """Crops of scikit-image's real texture photos (brick, grass, gravel; 512 x 512, CC0).

    Frame i is a `size` x `size` crop at a seeded random offset of the chosen texture, as grayscale repeated to
    three channels. Every `defect_every`-th frame (i % defect_every == defect_every - 1) has a square patch, a
    quarter of the frame wide, cut from another texture photo and pasted at a random place: a real-looking local
    defect. `count` frames are produced (forever with --loop).
    """

    def __init__(self, spec: SyntheticSpec, options: SourceOptions):
        super().__init__(options)
        if spec.texture not in TEXTURES:
            raise SourceError(f"synthetic: unknown texture {spec.texture!r}; choose one of {', '.join(TEXTURES)}")
        if not 16 <= spec.size <= 512:
            raise SourceError(f"synthetic: size must be between 16 and 512 pixels, got {spec.size}")
        if spec.count < 1:
            raise SourceError(f"synthetic: count must be at least 1, got {spec.count}")
        if spec.defect_every < 0:
            raise SourceError(f"synthetic: defect_every must be 0 (never) or more, got {spec.defect_every}")
        self.spec = spec
        self._photos = {name: _texture_photo(name) for name in TEXTURES}
        self.description = (
            f"synthetic {spec.texture} crops {spec.size}px, {spec.count} frames, defect every {spec.defect_every}"
        )

    def frames(self) -> Iterator[tuple[str, np.ndarray | InvalidImageError]]:
        rng = np.random.default_rng(self.spec.seed)
        base = self._photos[self.spec.texture]
        others = [self._photos[n] for n in TEXTURES if n != self.spec.texture]
        size = self.spec.size
        i = 0
        while True:
            for _ in range(self.spec.count):
                y, x = rng.integers(0, base.shape[0] - size + 1), rng.integers(0, base.shape[1] - size + 1)
                crop = base[y : y + size, x : x + size].copy()
                defective = self.spec.defect_every > 0 and i % self.spec.defect_every == self.spec.defect_every - 1
                if defective:
                    patch = max(4, size // 4)
                    donor = others[int(rng.integers(len(others)))]
                    dy, dx = rng.integers(0, donor.shape[0] - patch + 1), rng.integers(0, donor.shape[1] - patch + 1)
                    py, px = rng.integers(0, size - patch + 1), rng.integers(0, size - patch + 1)
                    crop[py : py + patch, px : px + patch] = donor[dy : dy + patch, dx : dx + patch]
                label = "defect" if defective else "normal"
                yield f"synthetic-{self.spec.texture}-{i:06d}-{label}", to_rgb(crop)
                i += 1
            if not self.options.loop:
                return


def _texture_photo(name: str) -> np.ndarray:
    from skimage import data as skdata

    image = getattr(skdata, name)()
    if image.ndim == 3:
        image = image[..., :3].mean(axis=2).astype(np.uint8)
    return np.ascontiguousarray(image.astype(np.uint8))


_SYNTHETIC_KEYS = {"texture": str, "size": int, "count": int, "defect_every": int, "seed": int}


def parse_synthetic(spec: str) -> SyntheticSpec:
    """'synthetic:' or 'synthetic:texture=grass,size=128,count=40,defect_every=5,seed=1' -> SyntheticSpec."""
    body = spec[len("synthetic:") :].strip()
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _SYNTHETIC_KEYS:
            raise SourceError(
                f"synthetic: cannot parse {item!r}; expected key=value with keys {', '.join(_SYNTHETIC_KEYS)}"
            )
        try:
            values[key] = _SYNTHETIC_KEYS[key](value.strip())
        except ValueError as exc:
            raise SourceError(f"synthetic: {key} must be {_SYNTHETIC_KEYS[key].__name__}, got {value!r}") from exc
    return SyntheticSpec(**values)  # type: ignore[arg-type]


def open_source(spec: str, options: SourceOptions | None = None) -> FrameSource:
    """A camera SOURCE string -> FrameSource. Folder, video file, rtsp/http stream, or 'synthetic:...'."""
    options = options or SourceOptions()
    if not spec or not spec.strip():
        raise SourceError("empty camera source")
    if spec.startswith("synthetic:"):
        return SyntheticSource(parse_synthetic(spec), options)
    if spec.lower().startswith(STREAM_SCHEMES):
        return VideoSource(spec, options)
    path = user_path(spec)
    if path.is_dir():
        return FolderSource(path, options)
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise SourceError(f"{spec} is a single image; give the folder that holds the camera's images")
        return VideoSource(spec, options)
    raise SourceError(
        f"camera source {redact(spec)!r} is neither a folder, a video file, an rtsp:// or http:// stream, nor "
        "'synthetic:'"
    )


_CAMERA_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # matched entirely (fullmatch): no trailing newline


class CameraFlag(NamedTuple):
    """One --camera flag: NAME[@PRODUCT]=SOURCE (product None: --model's)."""

    name: str
    source: str
    product: str | None = None


def check_name(name: str, what: str = "camera name") -> None:
    """A camera or product name is used in file and folder names, topics and model names, so it is kept to
    [A-Za-z0-9_.-], matched entirely, and may not be '.' or '..'; raises SourceError naming the problem."""
    if not _CAMERA_NAME.fullmatch(name):
        raise SourceError(f"{what} {name!r} may only use letters, digits, '_', '.' and '-'")
    if name in (".", ".."):
        raise SourceError(f"{what} {name!r} is not allowed (it names a folder: heat maps go to DIR/<camera>/)")


def parse_camera(text: str) -> CameraFlag:
    """'NAME=SOURCE' or 'NAME@PRODUCT=SOURCE' -> CameraFlag (names checked by check_name)."""
    label, sep, source = text.partition("=")
    name, at, product = label.partition("@")
    if not sep or not name or not source or (at and not product) or "://" in label:  # a URL without NAME=
        raise SourceError(f"--camera expects NAME=SOURCE or NAME@PRODUCT=SOURCE, got {redact(text)!r}")
    check_name(name)
    if at:
        check_name(product, "product")
    return CameraFlag(name, source, product or None)
