"""The service's web page in a real browser (headless Chromium, driven over the DevTools
protocol on a pipe): skimage's astronaut uploaded through the file input shows her box and the
probability bars; the webcam path (Chromium's fake camera) captures a frame and classifies it.
A screenshot of each is kept in the test's temporary folder. Skips without Chromium."""

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time

import pytest

pytest.importorskip('fastapi')
pytest.importorskip('httpx')
skimage_data = pytest.importorskip('skimage.data')

from PIL import Image  # noqa: E402

from tests.test_export import onnx_model  # noqa: E402,F401  (a fixture)
from tests.test_serve import running_server  # noqa: E402

CHROMIUM = next(
  (shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(n)),
  None,
)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason='no chromium (apt-get install chromium)')


class Browser:
  """Headless Chromium and one page, over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

  def __init__(self, profile: str):
    # Chromium's ends go to fd 5 or above first, so that putting them on 3 and 4 overwrites
    # neither.
    high = lambda fd: (fcntl.fcntl(fd, fcntl.F_DUPFD, 5), os.close(fd))[0]
    to_chrome_r, self._to_chrome = os.pipe()
    self._from_chrome, from_chrome_w = os.pipe()
    to_chrome_r, from_chrome_w = high(to_chrome_r), high(from_chrome_w)
    args = [
      CHROMIUM,
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--remote-debugging-pipe',
      f'--user-data-dir={profile}',
      '--window-size=1200,900',
      '--no-first-run',
      '--use-fake-device-for-media-stream',
      '--use-fake-ui-for-media-stream',
      'about:blank',
    ]
    # bash puts the pipes on fds 3 and 4 (a preexec_fn would fork a threaded process; dash
    # takes one-digit fds only).
    self._proc = subprocess.Popen(
      ['bash', '-c', f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', 'bash', *args],
      pass_fds=(to_chrome_r, from_chrome_w),
      stdout=subprocess.DEVNULL,
      stderr=open(os.path.join(profile, 'chromium.log'), 'w'),
    )
    self._log = os.path.join(profile, 'chromium.log')
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    self._buffer, self._next_id, self.session = b'', 0, None
    targets = self.send('Target.getTargets')['targetInfos']
    page = next(t for t in targets if t['type'] == 'page')
    self.session = self.send('Target.attachToTarget', targetId=page['targetId'], flatten=True)[
      'sessionId'
    ]

  def send(self, method: str, timeout: float = 30, **params):
    self._next_id += 1
    message = {'id': self._next_id, 'method': method, 'params': params}
    if self.session:
      message['sessionId'] = self.session
    os.write(self._to_chrome, json.dumps(message).encode() + b'\0')
    deadline = time.time() + timeout
    while True:
      while b'\0' in self._buffer:
        raw, self._buffer = self._buffer.split(b'\0', 1)
        reply = json.loads(raw)
        if reply.get('id') == self._next_id:
          if 'error' in reply:
            raise RuntimeError(f'{method}: {reply["error"]}')
          return reply['result']
      left = deadline - time.time()
      assert left > 0, f'{method}: no reply from Chromium in {timeout} s'
      if select.select([self._from_chrome], [], [], left)[0]:
        chunk = os.read(self._from_chrome, 1 << 20)
        assert chunk, f'Chromium closed the pipe: {self.log_tail()}'
        self._buffer += chunk

  def log_tail(self) -> str:
    with open(self._log) as f:
      return ' | '.join(line.strip() for line in f.readlines()[-5:] if 'dbus' not in line)

  def evaluate(self, expression: str):
    result = self.send('Runtime.evaluate', expression=expression, returnByValue=True)
    assert 'exceptionDetails' not in result, result['exceptionDetails']
    return result['result'].get('value')

  def wait_for(self, expression: str, timeout: float = 60):
    deadline = time.time() + timeout
    while not self.evaluate(expression):
      assert time.time() < deadline, f'{expression} still false after {timeout} s'
      time.sleep(0.1)

  def screenshot(self, path: str) -> bytes:
    png = base64.b64decode(self.send('Page.captureScreenshot', format='png')['data'])
    with open(path, 'wb') as f:
      f.write(png)
    return png

  def close(self):
    self._proc.kill()
    self._proc.wait(timeout=30)
    os.close(self._to_chrome)
    os.close(self._from_chrome)


@pytest.fixture(scope='module')
def page(onnx_model, tmp_path_factory):  # noqa: F811
  with running_server(onnx_model) as (base, _):
    browser = Browser(str(tmp_path_factory.mktemp('chromium_profile')))
    try:
      browser.send('Page.enable')
      browser.send('Page.navigate', url=base + '/')
      browser.wait_for(
        'document.readyState === "complete" && '
        '!document.getElementById("model").textContent.startsWith("loading")'
      )
      yield browser
    finally:
      browser.close()


FACES_JS = """[...document.querySelectorAll(".face")].map((c) => ({
  title: c.querySelector("h2").textContent,
  bars: Object.fromEntries([...c.querySelectorAll(".bar")].map(
      (b) => [b.dataset.class, parseFloat(b.querySelector(".value").textContent)]))}))"""


def test_uploaded_photo_shows_box_and_probabilities(page, tmp_path):
  photo = tmp_path / 'astronaut.png'
  Image.fromarray(skimage_data.astronaut()).save(photo)
  assert 'seed_cnn' in page.evaluate('document.getElementById("model").textContent')
  document = page.send('DOM.getDocument')
  node = page.send('DOM.querySelector', nodeId=document['root']['nodeId'], selector='#file')
  page.send('DOM.setFileInputFiles', files=[str(photo)], nodeId=node['nodeId'])
  page.wait_for('document.body.dataset.state === "done"')
  (face,) = page.evaluate(FACES_JS)
  assert face['title'].startswith('Face 1: ')
  assert len(face['bars']) == 7 and sum(face['bars'].values()) == pytest.approx(100, abs=0.5)
  assert page.evaluate('document.getElementById("status").textContent') == '1 face found'
  # The box is drawn on the canvas: green at the middle of its left edge.
  box = [int(v) for v in face['title'].split('[')[1].rstrip(']').split(',')]
  x, y, w, h = box
  assert 150 < x < 200 and 40 < y < 90  # Eileen Collins' face
  pixel = page.evaluate(
    f'[...document.getElementById("canvas").getContext("2d")'
    f'.getImageData({x}, {y + h // 2}, 1, 1).data]'
  )
  assert pixel[1] > 180 and pixel[0] < 60 and pixel[2] < 60
  shot = page.screenshot(str(tmp_path / 'upload.png'))
  assert shot[:8] == b'\x89PNG\r\n\x1a\n' and len(shot) > 50_000


def test_webcam_capture_is_classified(page, tmp_path):
  page.evaluate('document.getElementById("camera").click()')
  page.wait_for(
    'document.body.dataset.camera === "on" && document.getElementById("video").videoWidth > 0'
  )
  page.evaluate('document.body.dataset.state = ""; document.getElementById("capture").click()')
  page.wait_for('["done", "error"].includes(document.body.dataset.state)')
  status = page.evaluate('document.getElementById("status").textContent')
  assert page.evaluate('document.body.dataset.state') == 'done', status
  # Chromium's fake camera shows a moving pattern, not a face: a reply with a note.
  assert 'no face detected' in status
  assert page.evaluate('document.getElementById("canvas").width') == page.evaluate(
    'document.getElementById("video").videoWidth'
  )
  page.screenshot(str(tmp_path / 'webcam.png'))
