"""Find the faces in photos (or video frames) and name their expressions.

  python -m fer_jax.predict --workdir W [--checkpoint best] [--annotate_dir DIR]
      [--whole_image] [--detector haar|none] [--margin 0.1] PATH...
  python -m fer_jax.predict --model model.onnx PATH...     (an export of fer_jax.export)

PATH may be image files, folders (searched recursively for images and videos) or video files
(read frame by frame with OpenCV, every --frame_step-th frame). For each image or frame one JSON
line goes to stdout:

  {"path": ..., "width": W, "height": H, "faces": [{"box": [x, y, w, h], "emotion": "happy",
   "score": 0.91, "probabilities": {"angry": ..., ...}}, ...]}

(video frames add "frame" and "time_s"; an image without a face says "note": "no face
detected"). A file that cannot be read is one line `error: PATH: reason` on stderr and the rest
still run. Exit status: 0 when every input was read, 1 when any failed, 2 for a bad workdir or
bad flags.

Library use: `Predictor(workdir)` loads the checkpoint once (`Predictor(model='model.onnx')` an
ONNX export instead: onnxruntime, OpenCV and numpy only, JAX is never imported, so it starts in
a fraction of a second); `predict_image(rgb_array)` returns
the faces of one image and `predict_paths(paths)` yields the records above. Faces are found by a
pluggable detector, any callable (grayscale uint8 (H, W)) -> int (N, 4) boxes [x, y, w, h];
the default is OpenCV's frontal-face Haar cascade. Each face is cut out with a margin
(edge pixels repeat past the image border), converted to grayscale, resized to the training
images' size and classified; all faces of a group of images go through one jitted call.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from fer_jax.errors import DataError, FerJaxError

Detector = Callable[[np.ndarray], np.ndarray]

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg')
HAAR_CASCADE = 'haarcascade_frontalface_default.xml'
# Images are grouped so that their faces share one device call.
_IMAGES_PER_CALL = 16
# fer_jax.evaluation.TTA_MODES, repeated: importing fer_jax.evaluation imports JAX.
TTA_MODES = ('none', 'flip', 'tencrop')
ONNX_METADATA_KEY = 'fer_jax'  # fer_jax.export.METADATA_KEY


def _cv2():
  try:
    import cv2
  except ImportError:
    raise FerJaxError(
      'face detection needs OpenCV: pip install "opencv-python-headless<5"'
    ) from None
  return cv2


class HaarDetector:
  """OpenCV's Viola-Jones frontal-face cascade (shipped inside the OpenCV wheel).

  Large images are shrunk so their longer side is at most `max_side` before detection (the
  cascade's cost grows with the pixel count, and a face too small to find there would be too
  small to read) and the boxes are scaled back. Each thread gets its own cascade classifier
  (OpenCV's is not safe to share between threads; fer_jax.serve detects in a thread pool).
  """

  def __init__(
    self,
    cascade: str = HAAR_CASCADE,
    *,
    scale_factor: float = 1.1,
    min_neighbors: int = 5,
    min_size: int = 24,
    max_side: int = 1280,
  ):
    cv2 = _cv2()
    path = cascade if os.path.isfile(cascade) else os.path.join(cv2.data.haarcascades, cascade)
    if not hasattr(cv2, 'CascadeClassifier') or not os.path.isfile(path):
      raise FerJaxError(
        f'Haar cascade {cascade} not found (OpenCV {cv2.__version__}; the cascades '
        'ship with opencv-python-headless 4.x)'
      )
    self._path = path
    self._local = threading.local()
    self._local.classifier = cv2.CascadeClassifier(path)
    self._scale_factor, self._min_neighbors = scale_factor, min_neighbors
    self._min_size, self._max_side = min_size, max_side

  def __call__(self, gray: np.ndarray) -> np.ndarray:
    cv2 = _cv2()
    scale = min(1.0, self._max_side / max(gray.shape))
    small = (
      gray
      if scale == 1.0
      else cv2.resize(
        gray,
        (round(gray.shape[1] * scale), round(gray.shape[0] * scale)),
        interpolation=cv2.INTER_AREA,
      )
    )
    classifier = getattr(self._local, 'classifier', None)
    if classifier is None:
      classifier = self._local.classifier = cv2.CascadeClassifier(self._path)
    boxes = classifier.detectMultiScale(
      small,
      scaleFactor=self._scale_factor,
      minNeighbors=self._min_neighbors,
      minSize=(self._min_size, self._min_size),
    )
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) / scale
    return np.rint(boxes).astype(np.int64)


def whole_image(gray: np.ndarray) -> np.ndarray:
  """A 'detector' that calls the whole image one face (for already-cropped faces)."""
  return np.array([[0, 0, gray.shape[1], gray.shape[0]]], np.int64)


def to_gray(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W), (H, W, 1), RGB (H, W, 3) or RGBA (H, W, 4) -> uint8 grayscale (H, W)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got {image.dtype}')
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    return image
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f'expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {image.shape}')
  # ITU-R 601 luma, as PIL's convert('L') and OpenCV's RGB2GRAY.
  rgb = image[..., :3].astype(np.float32)
  return np.clip(np.rint(rgb @ np.array([0.299, 0.587, 0.114], np.float32)), 0, 255).astype(
    np.uint8
  )


def crop_face(gray: np.ndarray, box: Sequence[int], *, margin: float, size: int) -> np.ndarray:
  """The square around `box` grown by `margin` x its side on every side, as uint8 (size, size).

  Parts of the square outside the image repeat the edge pixels (as training's fill_mode).
  """
  x, y, w, h = (int(v) for v in box)
  side = max(w, h) * (1 + 2 * margin)
  cx, cy = x + w / 2, y + h / 2
  x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
  s = max(1, int(round(side)))
  height, width = gray.shape
  pad = [max(0, -y0), max(0, y0 + s - height), max(0, -x0), max(0, x0 + s - width)]
  region = gray[max(0, y0) : min(height, y0 + s), max(0, x0) : min(width, x0 + s)]
  if region.size == 0:
    raise ValueError(f'box {list(box)} lies outside the {width}x{height} image')
  if any(pad):
    region = np.pad(region, ((pad[0], pad[1]), (pad[2], pad[3])), mode='edge')
  return _resize(region, size)


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
  """To (size, size): pixel-area averaging when shrinking, bilinear when enlarging."""
  cv2 = _cv2()
  shrink = max(gray.shape) > size
  return cv2.resize(
    gray, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
  )


def read_image(path: str) -> np.ndarray:
  """An image file as uint8 RGB (H, W, 3), EXIF orientation applied; DataError if unreadable."""
  try:
    return _open_rgb(path, path)
  except FileNotFoundError:
    raise DataError(f'{path}: file not found') from None
  except IsADirectoryError:
    raise DataError(f'{path}: is a directory') from None


def decode_image(data: bytes, *, what: str = 'image', max_pixels: int | None = None) -> np.ndarray:
  """Encoded image bytes (JPEG, PNG, ...) as uint8 RGB (H, W, 3), EXIF orientation applied.

  Raises DataError (message starts with `what`) for empty, unidentifiable or truncated data,
  and ImageTooLarge, before decoding the pixels, when width x height exceeds `max_pixels`.
  """
  if not data:
    raise DataError(f'{what}: empty (0 bytes)')
  return _open_rgb(io.BytesIO(data), what, max_pixels)


class ImageTooLarge(DataError):
  """An image with more pixels than allowed (found from its header, before decoding)."""


def _open_rgb(source: Any, what: str, max_pixels: int | None = None) -> np.ndarray:
  from PIL import Image, ImageOps

  try:
    with Image.open(source) as img:
      if max_pixels is not None and img.width * img.height > max_pixels:
        raise ImageTooLarge(
          f'{what}: {img.width}x{img.height} is {img.width * img.height / 1e6:.1f} '
          f'megapixels; the limit is {max_pixels / 1e6:.1f}'
        )
      img = ImageOps.exif_transpose(img)
      return np.asarray(img.convert('RGB'), np.uint8)
  except Image.UnidentifiedImageError:
    raise DataError(f'{what}: not an image, or a corrupt one (Pillow cannot identify it)') from None
  except (FileNotFoundError, IsADirectoryError, DataError):
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    raise DataError(f'{what}: corrupt or unreadable image ({reason})') from None


def expand_paths(paths: Iterable[str]) -> list[str]:
  """Files as given; folders replaced by their image and video files (recursively, sorted)."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      found = []
      for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        found += [
          os.path.join(root, f)
          for f in files
          if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
        ]
      out += sorted(found)
    else:
      out.append(p)
  return out


def is_video(path: str) -> bool:
  return path.lower().endswith(VIDEO_EXTENSIONS)


class OnnxModel:
  """An ONNX export of fer_jax.export, run by onnxruntime (no JAX): faces -> probabilities."""

  def __init__(self, path: str):
    try:
      import onnxruntime as ort
    except ImportError:
      raise FerJaxError(
        'running an ONNX model needs onnxruntime: pip install "fer_jax[serve]"'
      ) from None
    if not os.path.isfile(path):
      raise FerJaxError(f'--model {path}: file not found')
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
      self._session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    except Exception as e:  # onnxruntime raises its own exception types, one per failure
      raise FerJaxError(
        f'--model {path}: onnxruntime cannot load it ({" ".join(str(e).split())[:200]})'
      ) from None
    raw = self._session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
    if raw is None:
      raise FerJaxError(
        f'--model {path}: no "{ONNX_METADATA_KEY}" metadata (not written by '
        'python -m fer_jax.export)'
      )
    self.metadata = json.loads(raw)
    self.path = path
    self.class_names = tuple(self.metadata['class_names'])
    self.face_size = int(self.metadata['face_size'])
    self._input = self._session.get_inputs()[0].name
    self._dtype = np.dtype(self.metadata['input']['dtype'])

  def __call__(self, faces: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S) faces -> float32 (N, K) probabilities."""
    batch = np.asarray(faces, np.uint8)[..., None].astype(self._dtype)
    return np.asarray(self._session.run(None, {self._input: batch})[0], np.float32)


def read_accuracy(workdir: str) -> dict[str, float]:
  """Split name -> accuracy of the best checkpoint, from the workdir's results.json ({} if none)."""
  try:
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return {}
  return {
    name: round(float(split['accuracy']), 4)
    for name, split in results.get('splits', {}).items()
    if 'accuracy' in split
  }


class Predictor:
  """A trained workdir (or an ONNX export) loaded once, for classifying the faces in images.

  Args:
    workdir: a trained workdir (JAX runs the checkpoint).
    checkpoint: 'best', 'latest' or a step.
    model: instead of `workdir`, an ONNX file written by fer_jax.export (onnxruntime runs it;
      JAX is not imported).
    detector: 'haar' (default), 'none' (the whole image is the face) or a callable
      gray uint8 (H, W) -> int (N, 4) [x, y, w, h] boxes.
    margin: fraction of the box side added on every side before cropping. FER2013's faces
      are cropped tight, about a Haar box plus 0.1: on skimage's astronaut a model trained on
      FER2013 says happy with p=0.91 at margin 0.1, 0.81 at 0.2 and 0.66 at 0.3.
    whole_image_fallback: when no face is found, classify the whole image as one face.
    tta: test-time augmentation, as in fer_jax.evaluation ('none', 'flip', 'tencrop'); a
      workdir only (an export is single view).
  """

  def __init__(
    self,
    workdir: str | None = None,
    checkpoint: str | int = 'best',
    *,
    model: str | None = None,
    detector: str | Detector = 'haar',
    margin: float = 0.1,
    whole_image_fallback: bool = False,
    tta: str = 'none',
  ):
    if (workdir is None) == (model is None):
      raise FerJaxError('give a workdir or an exported model (model=...), not both')
    if isinstance(detector, str):
      if detector not in ('haar', 'none'):
        raise FerJaxError(f"detector={detector!r}: expected 'haar', 'none' or a callable")
      detector = HaarDetector() if detector == 'haar' else whole_image
    if not margin >= 0:
      raise FerJaxError(f'margin={margin}: must be >= 0')
    if tta not in TTA_MODES:
      raise FerJaxError(f'tta={tta!r}: expected one of {TTA_MODES}')
    self.detector = detector
    self.margin = float(margin)
    self.whole_image_fallback = whole_image_fallback
    self.trained = None
    self.onnx: OnnxModel | None = None
    if model is not None:
      if tta != 'none':
        raise FerJaxError(f'tta={tta!r}: an exported model runs the single view only')
      self.onnx = OnnxModel(model)
      self.class_names, self.face_size = self.onnx.class_names, self.onnx.face_size
      return
    import jax

    from fer_jax import evaluation, trained_model

    device = jax.devices()[0]
    self.trained = trained_model.load(
      workdir, checkpoint, sharding=jax.sharding.SingleDeviceSharding(device)
    )
    self.class_names = self.trained.class_names
    self.face_size = self.trained.data_size
    self._fn = jax.jit(evaluation.probabilities_fn(self.trained, tta))

  def info(self) -> dict[str, Any]:
    """What serves the model: classes, input size, checkpoint step, accuracy (results.json)."""
    if self.onnx is not None:
      m = self.onnx.metadata
      return {
        'backend': 'onnxruntime',
        'source': os.path.basename(self.onnx.path),
        'model': m.get('model'),
        'classes': list(self.class_names),
        'face_size': self.face_size,
        'model_input_size': m.get('model_input_size'),
        'checkpoint_step': m.get('checkpoint_step'),
        'accuracy': m.get('accuracy', {}),
      }
    t = self.trained
    return {
      'backend': 'jax',
      'source': os.path.basename(t.workdir.rstrip(os.sep)),
      'model': str(t.config.model.name),
      'classes': list(self.class_names),
      'face_size': self.face_size,
      'model_input_size': t.image_size,
      'checkpoint_step': int(t.step),
      'accuracy': read_accuracy(t.workdir),
    }

  def classify_faces(self, faces: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S) grayscale faces at `face_size` -> float32 (N, K) probabilities."""
    faces = np.asarray(faces, np.uint8)
    if faces.ndim != 3 or faces.shape[1:] != (self.face_size, self.face_size):
      raise ValueError(f'expected (N, {self.face_size}, {self.face_size}) faces, got {faces.shape}')
    if len(faces) == 0:
      return np.zeros((0, len(self.class_names)), np.float32)
    if self.onnx is not None:
      return np.concatenate([self.onnx(faces[i : i + 256]) for i in range(0, len(faces), 256)])
    out = []
    for start in range(0, len(faces), 256):
      chunk = faces[start : start + 256]
      # Padding to a power of two (at least 8) keeps the number of compiled shapes small.
      padded = max(8, 1 << (len(chunk) - 1).bit_length())
      batch = np.zeros((padded, self.face_size, self.face_size, 1), np.uint8)
      batch[: len(chunk), ..., 0] = chunk
      out.append(np.asarray(self._fn(self.trained.variables, batch))[: len(chunk)])
    return np.concatenate(out)

  def find_faces(
    self, image: np.ndarray, *, whole_image_fallback: bool | None = None
  ) -> tuple[np.ndarray, bool, np.ndarray]:
    """(boxes int (N, 4), whole-image flag, uint8 (N, S, S) face crops) of one image.

    The detection half of prediction, kept apart from `classify_faces` so a server can batch
    the crops of several requests into one model call.
    """
    gray = to_gray(image)
    fallback = self.whole_image_fallback if whole_image_fallback is None else whole_image_fallback
    boxes = np.asarray(self.detector(gray), np.int64).reshape(-1, 4)
    whole = self.detector is whole_image
    if len(boxes) == 0 and fallback:
      boxes, whole = whole_image(gray), True
    if whole:  # stretched to a square, as the image-folder loader does
      crops = [_resize(gray, self.face_size)]
    else:
      crops = [crop_face(gray, b, margin=self.margin, size=self.face_size) for b in boxes]
    crops = np.stack(crops) if crops else np.zeros((0, self.face_size, self.face_size), np.uint8)
    return boxes, whole, crops

  def face_records(self, boxes: np.ndarray, probs: np.ndarray, whole: bool) -> list[dict[str, Any]]:
    """One JSON-ready dict per face (see `predict_image`)."""
    faces = []
    for box, p in zip(boxes, probs):
      top = int(np.argmax(p))
      face = {
        'box': [int(v) for v in box],
        'emotion': self.class_names[top],
        'score': round(float(p[top]), 4),
        'probabilities': {n: round(float(v), 4) for n, v in zip(self.class_names, p)},
      }
      if whole:
        face['whole_image'] = True
      faces.append(face)
    return faces

  def _predict_many(self, images: Sequence[np.ndarray]) -> list[list[dict[str, Any]]]:
    """Faces of several images, classified in one batch."""
    found = [self.find_faces(image) for image in images]
    crops = [c for _, _, c in found]
    probs = self.classify_faces(
      np.concatenate(crops) if crops else np.zeros((0, self.face_size, self.face_size), np.uint8)
    )
    out, start = [], 0
    for boxes, whole, _ in found:
      out.append(self.face_records(boxes, probs[start : start + len(boxes)], whole))
      start += len(boxes)
    return out

  def predict_image(self, image: np.ndarray) -> list[dict[str, Any]]:
    """The faces of one uint8 image (RGB (H, W, 3) or grayscale (H, W)).

    Returns one dict per face: 'box' [x, y, w, h] in pixels, 'emotion' (the top class),
    'score' (its probability) and 'probabilities' (class name -> probability).
    """
    return self._predict_many([image])[0]

  def predict_paths(self, paths: Iterable[str], *, frame_step: int = 1) -> Iterator[dict[str, Any]]:
    """One record per image (or video frame) of `paths`, in order; see the module doc.

    Unreadable inputs yield {'path': p, 'error': 'one line'} and the rest go on. Folders are
    searched recursively.
    """
    for record, _ in self.predict_paths_with_images(paths, frame_step=frame_step):
      yield record

  def predict_paths_with_images(
    self, paths: Iterable[str], *, frame_step: int = 1
  ) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
    """As predict_paths, each record with its RGB image (None for an error record)."""
    if frame_step < 1:
      raise ValueError(f'frame_step must be at least 1, got {frame_step}')
    pending: list[tuple[dict[str, Any], np.ndarray]] = []

    def flush():
      results = self._predict_many([image for _, image in pending])
      for (record, image), faces in zip(pending, results):
        record['faces'] = faces
        if not faces:
          record['note'] = 'no face detected'
        yield record, image
      pending.clear()

    for path in expand_paths(paths):
      try:
        frames = _read_video(path, frame_step) if is_video(path) else [({}, read_image(path))]
        for extra, image in frames:
          pending.append(
            (
              {'path': path, **extra, 'width': int(image.shape[1]), 'height': int(image.shape[0])},
              image,
            )
          )
          if len(pending) >= _IMAGES_PER_CALL:
            yield from flush()
      except DataError as e:
        yield from flush()
        yield {'path': path, 'error': str(e)}, None
    yield from flush()


def _read_video(path: str, frame_step: int) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
  """(frame index and time, RGB frame) for every `frame_step`-th frame of a video file."""
  cv2 = _cv2()
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found')
  capture = cv2.VideoCapture(path)
  try:
    if not capture.isOpened():
      raise DataError(f'{path}: cannot open the video (not a video OpenCV can decode)')
    fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    index = 0
    while True:
      ok, frame = capture.read()
      if not ok:
        break
      if index % frame_step == 0:
        info = {'frame': index}
        if fps > 0:
          info['time_s'] = round(index / fps, 3)
        yield info, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
      index += 1
    if index == 0:
      raise DataError(f'{path}: the video has no readable frames')
  finally:
    capture.release()


def annotate(image: np.ndarray, faces: Sequence[dict[str, Any]]) -> np.ndarray:
  """An RGB copy of `image` with each face's box and top emotion with its probability.

  Images smaller than 256 pixels are enlarged (by a whole factor, pixels kept sharp) first, so
  the label stays legible on a 48x48 face.
  """
  cv2 = _cv2()
  out = np.asarray(image)
  out = np.stack([out] * 3, -1) if out.ndim == 2 else out[..., :3]
  zoom = -(-256 // max(out.shape[:2])) if max(out.shape[:2]) < 256 else 1
  if zoom > 1:
    out = np.repeat(np.repeat(out, zoom, axis=0), zoom, axis=1)
  out = np.ascontiguousarray(out).copy()
  size = max(out.shape[:2])
  thickness = max(2, size // 250)
  font_scale = max(0.5, size / 900)
  for face in faces:
    x, y, w, h = (v * zoom for v in face['box'])
    cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), (0, 220, 0), thickness)
    label = f'{face["emotion"]} {face["score"]:.2f}'
    (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness // 2)
    # The label sits above the box, or inside its top edge when there is no room above.
    ty = y - base - 2 if y - th - base - 2 >= 0 else y + th + thickness + 2
    cv2.rectangle(out, (x, ty - th - 2), (x + tw + 4, ty + base), (0, 220, 0), -1)
    cv2.putText(
      out,
      label,
      (x + 2, ty),
      cv2.FONT_HERSHEY_SIMPLEX,
      font_scale,
      (0, 0, 0),
      max(1, thickness // 2),
      cv2.LINE_AA,
    )
  return out


class _Annotator:
  """Writes annotated copies into a folder: images as images, video frames as one video."""

  def __init__(self, out_dir: str):
    self._dir = out_dir
    self._used: set[str] = set()
    self._writers: dict[str, Any] = {}
    os.makedirs(out_dir, exist_ok=True)

  def _name(self, path: str, ext: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = f'{stem}{ext}', 1
    while name in self._used:  # two inputs with one name (from different folders)
      n += 1
      name = f'{stem}_{n}{ext}'
    self._used.add(name)
    return os.path.join(self._dir, name)

  def write(self, record: dict[str, Any], image: np.ndarray) -> None:
    cv2 = _cv2()
    bgr = cv2.cvtColor(annotate(image, record['faces']), cv2.COLOR_RGB2BGR)
    path = record['path']
    if 'frame' not in record:
      ext = os.path.splitext(path)[1].lower()
      cv2.imwrite(
        self._name(path, ext if ext in ('.png', '.jpg', '.jpeg', '.bmp') else '.png'), bgr
      )
      return
    if path not in self._writers:
      fourcc = cv2.VideoWriter_fourcc(*'MJPG')
      self._writers[path] = cv2.VideoWriter(
        self._name(path, '.avi'), fourcc, 10.0, (bgr.shape[1], bgr.shape[0])
      )
    self._writers[path].write(bgr)

  def close(self) -> None:
    for writer in self._writers.values():
      writer.release()


def main(argv: list[str]) -> None:
  import json

  from absl import app, flags

  f = flags.FLAGS
  if len(argv) < 2:
    raise app.UsageError('give one or more image files, folders or videos', exitcode=2)
  if f.frame_step < 1:
    raise app.UsageError('--frame_step must be at least 1', exitcode=2)
  if bool(f.workdir) == bool(f.model):
    raise app.UsageError(
      'give --workdir (a trained workdir) or --model (an ONNX export)', exitcode=2
    )
  from fer_jax import logs  # absl only: the --model path imports no JAX

  logs.quiet_library_logs()
  try:
    predictor = Predictor(
      f.workdir or None,
      f.checkpoint,
      model=f.model or None,
      detector=f.detector,
      margin=f.margin,
      whole_image_fallback=f.whole_image,
      tta=f.tta,
    )
  except FerJaxError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  annotator = _Annotator(f.annotate_dir) if f.annotate_dir else None
  failed = 0
  try:
    for record, image in predictor.predict_paths_with_images(argv[1:], frame_step=f.frame_step):
      if 'error' in record:
        failed += 1
        print(f'error: {record["error"]}', file=sys.stderr, flush=True)
        continue
      print(json.dumps(record), flush=True)
      if annotator:
        annotator.write(record, image)
  finally:
    if annotator:
      annotator.close()
  if failed:
    print(f'{failed} of the inputs failed', file=sys.stderr)
    sys.exit(1)


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string('workdir', '', 'A trained workdir (holds checkpoints/).')
  flags.DEFINE_string(
    'model',
    '',
    'Instead of --workdir: an ONNX file from fer_jax.export (run by onnxruntime, without JAX).',
  )
  flags.DEFINE_string('checkpoint', 'best', "'best' (PublicTest accuracy), 'latest' or a step.")
  flags.DEFINE_enum(
    'detector',
    'haar',
    ('haar', 'none'),
    "'haar': OpenCV's frontal-face cascade; 'none': each image is one face.",
  )
  flags.DEFINE_float('margin', 0.1, 'Added around each detected box, as a fraction of its side.')
  flags.DEFINE_bool(
    'whole_image', False, 'Classify the whole image as one face when no face is detected.'
  )
  flags.DEFINE_string(
    'annotate_dir',
    '',
    'Write a copy of each image with boxes and the top emotion here (videos as .avi).',
  )
  flags.DEFINE_integer('frame_step', 1, 'Videos: classify every N-th frame.')
  flags.DEFINE_enum('tta', 'none', TTA_MODES, 'Test-time augmentation (see fer_jax.evaluation).')


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
