"""The synthesis page as a person uses it: `recipes/app.py` in its own process, Debian's chromium driven headless by
selenium through chromedriver. The test paints strokes, fills and undoes on the canvas, samples, waits for the
images and checks that the map the server received is exactly the one painted (cell for cell, against an
independent replay of the strokes), then tries bad uploads and reads the messages in the page.

    make test                                            # tiny untrained exports built by tests/app/conftest.py
    SVQ_APP_DEMO_GPT=runs/demo/stage2/export SVQ_APP_RESULTS=benchmarks/results \\
        .venv/bin/python -m pytest tests/app/test_app_browser.py -k demo       # the README's screenshot and timing

Skips, saying why, where chromium, chromedriver or selenium is missing (`make test` installs the first two with
apt-get when it runs as root).
"""

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        return (
            "no headless browser: install Debian's chromium and chromium-driver "
            "(`apt-get install -y chromium chromium-driver`; `make test` does it as root)"
        )
    for mod in ("selenium", "starlette", "uvicorn"):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed (pip install -e '.[dev,app]')"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(400),
    pytest.mark.skipif(_missing() is not None, reason=str(_missing())),
]


# -- the server and the browser ------------------------------------------------------------------------------


class App:
    """recipes/app.py on a free port, in its own process."""

    def __init__(self, gpt: str, threads: int = 1):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it for the kernel tests; a user's server has none
        cmd = [sys.executable, str(ROOT / "recipes/app.py"), "--gpt", gpt, "--port", "0", "--threads", str(threads)]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.log: list[str] = []
        ready = threading.Event()
        self.url = None

        def read():
            for line in self.proc.stdout:
                self.log.append(line)
                m = re.search(r"serving (http://\S+?)/? ", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(120)
        assert self.url, "recipes/app.py did not start:\n" + "".join(self.log)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1500,1050",
        "--force-device-scale-factor=1",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    return driver


class Page:
    """What a person does on the page, in selenium calls."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By

        self.d, self.By = driver, By
        driver.get(url + "/")
        self.wait(lambda: driver.execute_script("return document.body.dataset.ready === '1'"), "the page to load")
        self.size = driver.execute_script("return window.svqApp.size")
        self.zoom = driver.execute_script("return window.svqApp.zoom")
        self.canvas = self.el("canvas")

    def el(self, id_):
        return self.d.find_element(self.By.ID, id_)

    def wait(self, cond, what: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = cond()
            if v:
                return v
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; page message: {self.message()!r}")

    def message(self) -> str:
        box = self.el("message")
        return box.text if box.is_displayed() else ""

    def grid(self) -> np.ndarray:
        ids = self.d.execute_script("return Array.from(window.svqApp.grid)")
        return np.asarray(ids, np.uint8).reshape(self.size, self.size)

    def _offset(self, cell):
        """Viewport offset of a map cell's centre from the canvas's centre (selenium's origin for elements)."""
        x, y = cell
        return (
            int((x + 0.5) * self.zoom - self.size * self.zoom / 2),
            int((y + 0.5) * self.zoom - self.size * self.zoom / 2),
        )

    def stroke(self, *cells):
        from selenium.webdriver.common.action_chains import ActionChains

        chain = ActionChains(self.d, duration=50)
        chain.move_to_element_with_offset(self.canvas, *self._offset(cells[0])).click_and_hold()
        for c in cells[1:]:
            chain.move_to_element_with_offset(self.canvas, *self._offset(c))
        chain.release().perform()

    def pick(self, class_id: int):
        self.d.find_element(self.By.CSS_SELECTOR, f'#palette li[data-class-id="{class_id}"]').click()

    def tool(self, name: str):
        self.d.find_element(self.By.CSS_SELECTOR, f'input[name=tool][value="{name}"]').click()

    def brush(self, size: int):
        from selenium.webdriver.common.keys import Keys

        slider = self.el("brush-size")
        slider.send_keys(Keys.HOME)  # size 1, then one step of 2 per arrow key
        for _ in range((size - 1) // 2):
            slider.send_keys(Keys.ARROW_RIGHT)
        assert self.el("brush-size-value").text == str(size)

    def setting(self, name: str, value):
        box = self.el(name)
        box.clear()
        box.send_keys(str(value))

    def sample(self, n: int) -> str:
        """Click sample; wait until n images are in the page -> the job id."""
        self.d.execute_script("delete document.getElementById('timing').dataset.firstSampleMs")
        self.d.execute_script("document.getElementById('samples').innerHTML = ''")
        self.el("sample").click()
        loaded = (
            "const imgs = [...document.querySelectorAll('#samples img')];"
            "return imgs.length === arguments[0] && imgs.every(i => i.complete && i.naturalWidth > 0)"
            " && document.getElementById('timing').dataset.firstSampleMs !== undefined"
        )
        self.statuses = []  # what the progress line said while waiting

        def done():
            status = self.d.execute_script("return document.getElementById('status').textContent")
            if not self.statuses or self.statuses[-1] != status:
                self.statuses.append(status)
            return self.d.execute_script(loaded, n)

        self.wait(done, f"{n} sample images", timeout=120)
        return self.el("samples").get_attribute("data-job")

    def first_sample_ms(self) -> float:
        return float(self.el("timing").get_attribute("data-first-sample-ms"))

    def upload(self, path: Path):
        self.d.execute_script("document.getElementById('message').hidden = true")
        self.el("upload").send_keys(str(path))


# -- an independent replay of the page's brush, fill and stroke rules -----------------------------------------


def stamp(grid, x, y, size, c):
    r = (size - 1) // 2
    n = grid.shape[0]
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= r * (r + 1) and 0 <= x + dx < n and 0 <= y + dy < n:
                grid[y + dy, x + dx] = c


def straight(grid, a, b, size, c):
    """An axis-aligned stroke: the same cells whatever pointer events the browser sent along it."""
    (x0, y0), (x1, y1) = a, b
    assert x0 == x1 or y0 == y1
    for x in range(min(x0, x1), max(x0, x1) + 1):
        for y in range(min(y0, y1), max(y0, y1) + 1):
            stamp(grid, x, y, size, c)


def flood(grid, x, y, c):
    target, n = grid[y, x], grid.shape[0]
    if target == c:
        return
    todo = [(x, y)]
    grid[y, x] = c
    while todo:
        cx, cy = todo.pop()
        for nx, ny in ((cx - 1, cy), (cx + 1, cy), (cx, cy - 1), (cx, cy + 1)):
            if 0 <= nx < n and 0 <= ny < n and grid[ny, nx] == target:
                grid[ny, nx] = c
                todo.append((nx, ny))


# -- the tests --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = _driver(tmp_path_factory.mktemp("chromium_profile"))
    yield driver
    driver.quit()


def _ids_png(array, path):
    from PIL import Image

    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def test_paint_sample_and_bad_uploads(browser, exports, tmp_path):
    from svq_fast.app.maps import read_png
    from svq_fast.app.synth import Synthesizer

    app = App(exports["gpt"])
    try:
        page = Page(browser, app.url)
        n = page.size
        assert n == exports["size"] and page.message() == ""
        synth = Synthesizer(exports["gpt"])
        assert np.array_equal(page.grid(), synth.heldout(0)[3])  # the page opens on the first held-out map

        expected = np.empty((n, n), np.uint8)
        page.pick(2)  # grass everywhere
        page.el("clear").click()
        expected[:] = 2
        page.pick(8)  # a car-coloured horizontal bar, brush 5
        page.brush(5)
        page.stroke((3, 5), (15, 5), (28, 5))
        straight(expected, (3, 5), (28, 5), 5, 8)
        page.pick(9)  # a vertical line of person, brush 3
        page.brush(3)
        page.stroke((20, 2), (20, 29))
        straight(expected, (20, 2), (20, 29), 3, 9)
        page.pick(14)  # a dab, then undo it
        page.brush(1)
        page.stroke((10, 25))
        assert page.grid()[25, 10] == 14
        page.el("undo").click()
        page.tool("fill")  # flood the grass with water
        page.pick(5)
        page.stroke((0, n - 1))
        flood(expected, 0, n - 1, 5)
        assert np.array_equal(page.grid(), expected), "the page's map differs from the replayed strokes"

        page.tool("brush")  # a diagonal stroke: cells depend on the pointer events, so only bounds are checked
        page.pick(12)
        page.brush(3)
        page.stroke((2, 28), (7, 23), (12, 18))
        painted = page.grid()
        changed = painted != expected
        assert changed.any() and set(np.unique(painted[changed])) == {12}
        ys, xs = np.nonzero(changed)
        assert (np.abs((xs - 2) + (ys - 28)) <= 4).all()  # within the brush of the line x + y = 30

        page.setting("num_samples", 2)
        page.setting("seed", 5)
        job = page.sample(2)
        received = read_png(app.get(f"/api/jobs/{job}/files/painted_ids.png"))
        assert np.array_equal(received, painted), "the server received another map than the one painted"
        assert set(np.unique(received)) <= {2, 5, 8, 9, 12}  # no in-between colours became classes
        # the understood map is a separate image request: it may still be loading when the samples are in
        understood_width = "const i = document.getElementById('understood'); return i.complete && i.naturalWidth"
        assert page.wait(lambda: browser.execute_script(understood_width), "the understood map image") == n
        links = browser.find_elements(page.By.CSS_SELECTOR, "#downloads a[download]")
        assert len(links) == 2 + 5 and all(a.get_attribute("href").startswith(app.url) for a in links)
        assert "done" in page.el("status").text and "click to first sample" in page.el("timing").text
        shot = Path(os.environ.get("SVQ_APP_SCREENSHOT", tmp_path / "app_test.png"))
        assert browser.save_screenshot(str(shot))

        # bad uploads: a clear message in the page, the map unchanged; then a good one
        (tmp_path / "notes.png").write_text("not an image")
        page.upload(tmp_path / "notes.png")
        page.wait(lambda: "not a PNG" in page.message(), "the non-PNG message")
        page.upload(_ids_png(np.zeros((16, 16)), tmp_path / "small.png"))
        page.wait(lambda: "is 16x16; this model takes maps from 32x32" in page.message(), "the wrong-size message")
        bad = np.full((n, n), 3, np.uint8)
        bad[0, 0] = 99
        page.upload(_ids_png(bad, tmp_path / "bad_ids.png"))
        page.wait(lambda: "outside this model's label space: 99" in page.message(), "the label-space message")
        assert np.array_equal(page.grid(), painted)
        good = synth.heldout(4)[3]
        page.upload(_ids_png(good, tmp_path / "good.png"))
        page.wait(lambda: np.array_equal(page.grid(), good), "the uploaded map on the canvas")
        assert page.message() == ""
        page.el("undo").click()
        assert np.array_equal(page.grid(), painted)

        page.el("load-heldout").click()  # the page opened on held-out map 0: this is the next one
        page.wait(lambda: np.array_equal(page.grid(), synth.heldout(1)[3]), "held-out map 1")

        # a wrong export typed into the page: a message, and the model stays
        box = page.el("gpt-dir")
        box.clear()
        box.send_keys(exports["stage1"])
        page.el("load-model").click()
        page.wait(lambda: "is a stage-1 export" in page.message(), "the wrong-stage message")
        assert app.alive()
        job2 = page.sample(2)
        assert job2 != job
    finally:
        app.close()


def test_a_larger_canvas(browser, exports):
    """The canvas menu offers the larger / non-square sizes up to the limit; a 32x64 canvas keeps the painted cells
    that fit, extends the edge, paints on its right half, samples 32x64 images, and undo takes the size back."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    from svq_fast.app.maps import read_png

    app = App(exports["gpt"])
    try:
        page = Page(browser, app.url)
        n = page.size
        before = page.grid()
        menu = Select(page.el("canvas-size"))
        assert [o.get_attribute("value") for o in menu.options] == [f"{h}x{w}" for h in (n, 2 * n) for w in (n, 2 * n)]
        menu.select_by_value(f"{n}x{2 * n}")
        shape = lambda: tuple(browser.execute_script("return [window.svqApp.h, window.svqApp.w]"))  # noqa: E731
        page.wait(lambda: shape() == (n, 2 * n), "the 32x64 canvas")
        wide = np.asarray(browser.execute_script("return Array.from(window.svqApp.grid)"), np.uint8).reshape(n, 2 * n)
        assert np.array_equal(wide[:, :n], before) and (wide[:, n:] == before[:, -1:]).all()
        zoom = browser.execute_script("return window.svqApp.zoom")
        assert page.canvas.size["width"] == 2 * n * zoom and page.canvas.size["height"] == n * zoom
        page.pick(8)
        page.brush(5)
        x, y = 50, 10  # a dab on the new right half (selenium offsets are from the canvas's centre)
        off = (int((x + 0.5) * zoom - n * zoom), int((y + 0.5) * zoom - n * zoom / 2))
        ActionChains(browser, duration=50).move_to_element_with_offset(page.canvas, *off).click().perform()
        painted = np.asarray(browser.execute_script("return Array.from(window.svqApp.grid)"), np.uint8)
        painted = painted.reshape(n, 2 * n)
        assert painted[y, x] == 8 and set(np.unique(painted[painted != wide])) <= {8}
        page.setting("num_samples", 1)
        job = page.sample(1)
        assert np.array_equal(read_png(app.get(f"/api/jobs/{job}/files/painted_ids.png")), painted)
        assert read_png(app.get(f"/api/jobs/{job}/files/sample_0.png")).shape == (n, 2 * n, 3)
        page.el("undo").click()  # the dab
        page.el("undo").click()  # the size
        page.wait(lambda: shape() == (n, n), "undo of the canvas size")
        assert np.array_equal(page.grid(), before)
    finally:
        app.close()


DEMO_GPT = os.environ.get("SVQ_APP_DEMO_GPT", "")


@pytest.mark.skipif(not DEMO_GPT, reason="set SVQ_APP_DEMO_GPT=runs/demo/stage2/export for the README screenshot")
def test_demo_page_screenshot_and_timing(browser):
    """The committed screenshot and the click-to-first-sample time, from the trained demo exports."""
    out = Path(os.environ.get("SVQ_APP_RESULTS", "benchmarks/results"))
    load_before = os.getloadavg()[0]
    app = App(DEMO_GPT, threads=int(os.environ.get("SVQ_APP_THREADS", "2")))
    try:
        page = Page(browser, app.url)
        page.el("load-heldout").click()  # held-out map 2
        page.el("load-heldout").click()
        time.sleep(0.5)
        page.pick(7)  # a house
        page.brush(5)
        for y in range(38, 50, 2):
            page.stroke((40, y), (54, y))
        page.pick(6)  # a tree
        page.brush(13)
        page.stroke((14, 40))
        page.setting("num_samples", 1)
        times, server = [], []
        for seed in range(1, 8):  # one 64x64 sample per click
            page.setting("seed", seed)
            job = page.sample(1)
            times.append(page.first_sample_ms())
            server.append(json.loads(app.get(f"/api/jobs/{job}/files/settings.json"))["timings"])
        page.setting("num_samples", 4)
        page.setting("seed", 0)
        page.sample(4)
        steps = [int(m.group(1)) for t in page.statuses if (m := re.match(r"sampling image tokens: (\d+) / 256", t))]
        assert any(0 < k < 256 for k in steps), page.statuses  # progress showed while the tokens were drawn
        out.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(out / "app_screenshot.png"))
        result = {
            "what": "click on 'sample' to the first sample image loaded in the page (one 64x64 sample), headless "
            "chromium on the same machine as recipes/app.py",
            "gpt": DEMO_GPT,
            "torch_threads": int(os.environ.get("SVQ_APP_THREADS", "2")),
            "machine": _cpu(),
            "load_average_1min_before_after": [load_before, os.getloadavg()[0]],  # other jobs on the 2 vCPUs
            "click_to_first_sample_ms": [round(t, 1) for t in times],
            "median_ms": round(statistics.median(times), 1),
            "first_click_ms": round(times[0], 1),
            "server_s_median": {k: round(statistics.median(s[k] for s in server), 4) for k in server[0]},
        }
        (out / "app_timing.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        assert result["median_ms"] < 2000
    finally:
        app.close()


def _cpu() -> str:
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} vCPUs, {platform.system()}"
