"""The run report: one self-contained HTML page (nothing fetched from a network), with a row per
image, and, in a real headless Chromium, a table that sorts and filters."""

import base64
import json
import re
import shutil

import pytest

from spade_faiss.apps import cli
from spade_faiss.apps.report import write_report
from spade_faiss.apps.runs import read_rows

from .conftest import FEAT, RUN

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("report")
    store = tmp / "c.h5"
    assert cli.main(["index", str(dataset / "train" / "good"), "--out", str(store), *FEAT]) == 0
    assert cli.main(["score", str(store), str(dataset), "--out", str(tmp / "run"), *RUN, "--k-gallery", "5"]) == 0
    return tmp / "run"


def test_the_report_is_self_contained_with_a_row_per_image(run_dir, capsys):
    html = (run_dir / "report.html").read_text()
    rows = read_rows(run_dir / "scores.csv")
    assert html.count("<tr data-score=") == len(rows) == 7
    for r in rows:
        assert r["image_path"] in html
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", html)  # nothing from a network
    images = re.findall(r"src='data:image/(?:jpeg|png);base64,([^']+)'", html)
    assert len(images) >= 2 * 7  # overlay and nearest normal per image
    assert all(base64.b64decode(i)[:4] in (b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"\x89PNG") for i in images)
    (histogram,) = re.findall(r"src='data:image/svg\+xml;base64,([^']+)'", html)  # the score histogram
    assert base64.b64decode(histogram).count(b'class="bin"') == 5  # 7 scores: the fewest bins
    assert "image_AUROC (folders as labels)" in html  # test/good and test/defect: labels are known
    assert html.count("<td class='not-calibrated'>not calibrated</td>") == 7  # no thresholds: said, not blank
    assert html.count("data-regions='0'") == 7 and "defect regions</th>" in html  # no theta: no regions
    # `spade-faiss report` rewrites it from the run files alone.
    (run_dir / "report.html").unlink()
    assert cli.main(["report", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(run_dir / "report.html")
    with pytest.raises(ValueError, match="not a run directory"):
        write_report(run_dir / "overlays")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_the_report_in_a_real_browser_sorts_filters_and_renders(run_dir, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get((run_dir / "report.html").as_uri())

        def scores():
            return [float(r.get_attribute("data-score")) for r in driver.find_elements(By.CSS_SELECTOR,
                                                                                      "#images tbody tr")]
        first = scores()
        assert len(first) == 7 and first == sorted(first, reverse=True)  # highest score first
        assert driver.find_element(By.ID, "count").text == "7 of 7 images"
        header = driver.find_element(By.CSS_SELECTOR, "#images th[data-key='score']")
        header.click()
        assert scores() == sorted(first)  # ascending after a click: the order changed
        header.click()
        assert scores() == sorted(first, reverse=True)
        box = driver.find_element(By.ID, "filter")
        box.send_keys("defect")
        assert len(scores()) == 4 and driver.find_element(By.ID, "count").text == "4 of 7 images"
        box.clear()
        box.send_keys("x")  # clear() fires no input event: type and erase
        box.send_keys("\b")
        assert len(scores()) == 7
        script = "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
        assert driver.execute_script(script)  # every picture decodes
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
