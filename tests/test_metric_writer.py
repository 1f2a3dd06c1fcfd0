"""MetricWriter: one metrics.jsonl line per record, and the record's scalars in one TensorBoard
event (tensorboardX queues each event through a multiprocessing queue: one per value cost
~0.6 ms a record in the train loop)."""

import json
import struct

from tensorboardX.proto import event_pb2

from fer_jax.metric_writer import MetricWriter


def _events(path) -> list:
  """The events of a TensorBoard event file (TFRecord framing: length, its CRC, data, CRC)."""
  data, i, out = path.read_bytes(), 0, []
  while i < len(data):
    (n,) = struct.unpack('<Q', data[i : i + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[i + 12 : i + 12 + n])
    out.append(event)
    i += 12 + n + 4
  return out


def test_a_record_is_one_line_and_one_event_of_its_scalars(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(5, {'loss': 1.5, 'accuracy': 0.25, 'epoch': 1, 'per_class': [1, 2]}, 'train')
  writer.write(10, {'loss': 1.0}, 'train')
  writer.close()
  lines = [json.loads(x) for x in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert lines[0] == {
    'step': 5,
    'split': 'train',
    'loss': 1.5,
    'accuracy': 0.25,
    'epoch': 1,
    'per_class': [1, 2],
  }
  (events_file,) = (tmp_path / 'tensorboard').iterdir()
  scalars = [
    (e.step, [(v.tag, v.simple_value) for v in e.summary.value])
    for e in _events(events_file)
    if e.summary.value
  ]
  assert scalars == [
    (5, [('train/loss', 1.5), ('train/accuracy', 0.25)]),
    (10, [('train/loss', 1.0)]),
  ]
