"""The dashboard and the correction editor in a real browser (Debian's Chromium, headless).

One node for the module: a TINY phantom stored through the ingest receiver, segmented by the threshold
engine with a ``seg.dcm`` output, delivered by the outbox to a folder destination; served by the app
of ``segnode serve``. The editor test paints, erases, saves, and reads the new SEG back.
"""

from __future__ import annotations

import base64
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.phantom import PhantomSpec
from tests.browser.fixtures import DESTINATION, TOKENS, Node, disc, running_node, stroke

#: Slice the editor test paints on, and its stroke (voxels, x along a row), brush and eraser sizes.
SLICE, ROW, X0, X1, BRUSH, ERASE_AT, ERASER = 23, 30, 18, 40, 5, 29, 3
#: The second series the dashboard test drops (through the file chooser, sent as STOW-RS).
DROPPED = PhantomSpec(size=(64, 64, 40), spacing=(3.2, 3.2, 6.0), seed=7)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with running_node(tmp_path_factory.mktemp("node"), extra={"dropped": DROPPED}) as n:
        yield n


@pytest.fixture
def page(browser_context):
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" and "Failed to load resource" not in msg.text else None)
    page.errors = errors
    yield page
    page.close()
    assert errors == [], errors


def sign_in(page, token: str) -> None:
    page.fill("#token", token)
    page.click("#login button[type=submit]")


def voxel_point(page, i: int, j: int, columns: int, rows: int) -> tuple[float, float]:
    """Page coordinates of the centre of voxel (i, j) on the editor's canvas."""
    box = page.locator("#overlay").bounding_box()
    return box["x"] + (i + 0.5) * box["width"] / columns, box["y"] + (j + 0.5) * box["height"] / rows


def page_text(page) -> str:
    """Everything the page holds as text, shown or not (hidden rows and titles included)."""
    return page.evaluate("""() => document.documentElement.outerHTML""")


def test_dashboard_shows_the_job_and_takes_dropped_files(node: Node, page, screenshots: Path) -> None:
    page.goto(node.url + "/")
    page.wait_for_selector(".message.info")
    assert page.inner_text("#message") == "Sign in with your API token."
    assert "Doe" not in page_text(page) and "PID-0042" not in page_text(page)  # signed out: no patient
    sign_in(page, TOKENS["alice"])
    row = page.locator(f"#jobs tr[data-job='{node.job_id}']")
    row.wait_for()
    assert page.inner_text("#who") == "signed in as alice"
    cells = row.locator("td")
    # Signed in: the patient and study, from the series' own header.
    study_date = pydicom.dcmread(next(Path(node.store.get(node.job_id).folder).glob("*.dcm")),
                                 stop_before_pixels=True).StudyDate
    assert cells.nth(1).locator(".patient-name").inner_text() == "Doe Jane"
    assert cells.nth(1).locator(".muted").inner_text() == (
        f"ID PID-0042 · acc. ACC-7781 · {study_date[:4]}-{study_date[4:6]}-{study_date[6:]}")
    assert cells.nth(1).locator(".series-description").inner_text() == "Phantom for the editor"
    # Links to the study in segnode viewer (OHIF), in a new tab.
    viewer = row.locator("a.viewer")
    assert (viewer.get_attribute("href"), viewer.get_attribute("target")) == (
        f"http://127.0.0.1:3000/viewer?StudyInstanceUIDs={node.study_uid}", "_blank")
    assert row.locator("button.review-sheet").count() == 0  # no review sheet among this job's results
    assert cells.nth(3).inner_text() == "stow"
    assert cells.nth(4).inner_text() == "ct-threshold\nthreshold"
    assert cells.nth(5).inner_text() == "done"
    assert cells.nth(6).inner_text() == "done"
    assert cells.nth(7).inner_text().strip() == "100%"
    assert sorted(t.split(" ")[0] for t in cells.nth(8).locator("span span").all_inner_texts()) == [
        "load", "prepare", "seg", "segment", "write"]
    row.locator(".delivery .badge").filter(has_text="delivered").wait_for()
    assert row.locator(".delivery").inner_text().startswith(f"{DESTINATION} delivered")
    assert page.inner_text("#queue-depth") == "0 queued"
    row.locator("button.files").click()
    files = page.locator("tr.artifacts button.link")
    files.first.wait_for()
    assert [t.split(" ")[0] for t in files.all_inner_texts()] == [
        "report.json", "labels.nii.gz", "classes.json", "stats.csv", "seg.dcm"]
    with page.expect_download() as download:
        files.first.click()
    assert download.value.suggested_filename == "report.json"
    series_row = page.locator(f"#series tr[data-series='{node.series_uid}']")
    assert series_row.locator("td").nth(3).inner_text() == "40"
    assert series_row.locator("td").nth(5).inner_text() == "rule ct-threshold"
    page.screenshot(path=str(screenshots / "dashboard.png"), full_page=True)

    # Dropped files go through STOW-RS; the new series is routed and segmented, the page follows.
    dropped = sorted(node.extra["dropped"].glob("*.dcm"))
    files = [(p.name, base64.b64encode(p.read_bytes()).decode()) for p in dropped]
    files.append(("README.txt", base64.b64encode(b"not DICOM").decode()))
    transfer = page.evaluate_handle("""(files) => {
        const transfer = new DataTransfer();
        for (const [name, b64] of files) {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            transfer.items.add(new File([bytes], name));
        }
        return transfer;
    }""", files)
    page.dispatch_event("#drop", "dragover", {"dataTransfer": transfer})
    assert "dragging" in page.get_attribute("#drop", "class")
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_selector(".upload-status.ok")
    assert page.inner_text("#upload-status") == (
        f"stored {len(dropped)} of {len(dropped)} DICOM file(s), 1 non-DICOM file(s) skipped")
    new_row = page.locator("#jobs tbody tr[data-state='done']")
    new_row.nth(1).wait_for(timeout=20_000)
    assert new_row.count() == 2
    page.screenshot(path=str(screenshots / "dashboard-after-drop.png"), full_page=True)

    # A review sheet among the job's results: linked, and shown in the page when asked for.
    from PIL import Image

    sheet = Path(node.store.get(node.job_id).results) / "review.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(sheet)
    try:
        row.locator("button.review-sheet").click()  # appears with the next poll
        image = page.locator(f"#jobs tr.review-row img.review")
        image.wait_for(state="visible")
        page.wait_for_function("() => document.querySelector('img.review').naturalWidth > 0")
        assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [40, 30]
        page.screenshot(path=str(screenshots / "dashboard-review-sheet.png"), full_page=True)
    finally:
        sheet.unlink()

    # Signed out: the tables go, and with them every patient name the page held.
    page.click("#signout")
    page.wait_for_function("() => !document.querySelector('#jobs tbody tr')")
    text = page_text(page)
    assert "Doe" not in text and "PID-0042" not in text and "ACC-7781" not in text


def test_dashboard_retry_button(node: Node, page, screenshots: Path) -> None:
    from node.jobs.store import Job

    job = Job(id="failedjob0000001", key="k-failed", series_uid="1.2.3.4.5", study_uid="1.2.3.4",
              generation=1, folder=str(node.data_dir / "nowhere"), instance_count=3, rule="ct-threshold",
              pipeline={}, pipeline_version="v", engine="threshold", created=time.time())
    node.store.submit(job)
    claimed = node.store.claim(job.id, "test")
    node.store.fail(job.id, claimed.run_id, "missing_slices", "slice 2 of 3 is missing", None)
    node.run_jobs[0] = False  # the retried job stays queued, so the page can show it
    try:
        page.goto(node.url + "/")
        sign_in(page, TOKENS["bob"])
        row = page.locator(f"#jobs tr[data-job='{job.id}']")
        row.wait_for()
        assert row.locator("td").nth(5).inner_text() == "failed"
        assert row.locator("td").nth(9).inner_text() == "missing_slices: slice 2 of 3 is missing"
        page.screenshot(path=str(screenshots / "dashboard-failed-job.png"), full_page=True)
        row.locator("button.retry").click()
        page.locator(f"#jobs tr[data-job='{job.id}'][data-state='queued']").wait_for()
        assert page.inner_text("#message") == f"job {job.id} queued again"
        assert node.store.get(job.id).history[-1]["detail"] == "retried by bob"
        assert page.inner_text("#queue-depth") == "1 queued"
    finally:
        node.run_jobs[0] = True


def test_editor_paint_erase_save(node: Node, page, screenshots: Path) -> None:
    from node.dicom.seg import read_seg
    from node.dicom.series import read_series

    job = node.store.get(node.job_id)
    ct = read_series(Path(job.folder))
    base = read_seg(Path(job.results) / "seg.dcm", ct)
    n, rows, columns = ct.array.shape

    page.goto(f"{node.url}/edit/{node.series_uid}")
    sign_in(page, TOKENS["alice"])
    page.wait_for_selector("body[data-ready='1']")
    assert page.get_attribute("body", "data-slice") == str(n // 2)
    assert page.inner_text("#base").endswith(f"labels: job {node.job_id} (seg.dcm) (version 1)")
    assert page.locator("#labels li .name").all_inner_texts() == [base.classes[i].name for i in sorted(base.classes)]

    # Navigation: keys, then the wheel, to the slice to paint.
    page.focus("#viewport")
    for _ in range(SLICE - n // 2 - 1):
        page.keyboard.press("ArrowDown")
    page.wait_for_selector(f"body[data-slice='{SLICE - 1}']")
    x, y = voxel_point(page, 5, 5, columns, rows)
    page.mouse.move(x, y)
    page.mouse.wheel(0, 100)
    page.wait_for_selector(f"body[data-slice='{SLICE}']")
    assert page.input_value("#slider") == str(SLICE)

    # A new label, a brush stroke along a row, an eraser dab in its middle.
    page.fill("#new-label", "lesion")
    page.click("#add-label button")
    new_id = max(base.classes) + 1
    assert page.inner_text("#labels li.active .name") == "lesion"
    assert page.input_value("#size") == str(BRUSH)
    page.mouse.move(*voxel_point(page, X0, ROW, columns, rows))
    page.mouse.down()
    page.mouse.move(*voxel_point(page, X1, ROW, columns, rows), steps=12)
    page.mouse.up()
    page.keyboard.press("e")
    page.keyboard.press("[")
    assert page.input_value("#size") == str(BRUSH - 1)
    page.keyboard.press("[")
    page.mouse.click(*voxel_point(page, ERASE_AT, ROW, columns, rows))
    assert page.get_attribute("body", "data-edited") == str(SLICE)
    # Undo takes the eraser dab back, redo does it again.
    page.keyboard.press("Control+z")
    painted = page.evaluate(f"Array.from(window.segnodeEditor.labels.get({SLICE}))")
    page.keyboard.press("Control+y")
    edited = page.evaluate(f"Array.from(window.segnodeEditor.labels.get({SLICE}))")
    shape = (rows, columns)
    expected_stroke = base.array[SLICE].copy()
    expected_stroke[stroke(shape, X0, X1, ROW, BRUSH)] = new_id
    expected = expected_stroke.copy()
    expected[disc(shape, ERASE_AT, ROW, ERASER)] = 0
    assert np.array_equal(np.array(painted).reshape(shape), expected_stroke)
    assert np.array_equal(np.array(edited).reshape(shape), expected)
    page.screenshot(path=str(screenshots / "editor-before-save.png"))

    page.click("#save")
    page.wait_for_selector(".save-status.ok")
    status = page.inner_text("#save-status")
    assert status.startswith("Saved version 2 (SEG ")
    assert status.endswith(f"on slice(s) {SLICE}; outbox: {DESTINATION}.")
    assert page.get_attribute("body", "data-edited") == ""
    page.screenshot(path=str(screenshots / "editor-after-save.png"))

    # The new SEG: in the corrections folder and delivered by the outbox; the stroke where it was drawn.
    saved = node.data_dir / "corrections" / node.series_uid / "v2.dcm"
    labels = read_seg(saved, ct)
    assert labels.classes[new_id].name == "lesion"
    assert np.array_equal(labels.array[SLICE], expected)
    others = np.arange(n) != SLICE
    assert np.array_equal(labels.array[others], base.array[others])
    import pydicom

    ds = pydicom.dcmread(saved, stop_before_pixels=True)
    assert (str(ds.ContentCreatorName), ds.SeriesNumber, ds.SeriesDescription) == (
        "alice", 2001, "segnode SEG v2 Phantom for the editor")
    assert ds.FrameOfReferenceUID == ct.source.frame_of_reference_uid
    delivered = node.archive / node.study_uid / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    deadline = time.monotonic() + 10
    while not delivered.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert delivered.read_bytes() == saved.read_bytes()

    # The annotation log: one row, downloadable as CSV from the dashboard's button.
    changed = sorted({int(i) for i in np.unique(base.array[SLICE][expected != base.array[SLICE]])} - {0})
    names = ";".join([base.classes[i].name for i in changed] + ["lesion"])
    page.goto(node.url + "/")
    page.locator("#annotations tbody tr td").first.wait_for()
    with page.expect_download() as download:
        page.click("#csv")
    text = Path(download.value.path()).read_text()
    header, line = text.strip().split("\n")
    assert header == ("time,user,study_uid,series_uid,seg_uid,seg_series_uid,version,base,slices,"
                      "source_instances,labels,voxels_changed,path,delivery")
    fields = line.split(",")
    voxels = int((expected != base.array[SLICE]).sum())
    assert fields[1:] == ["alice", node.study_uid, node.series_uid, ds.SOPInstanceUID, ds.SeriesInstanceUID, "2",
                          f"job {node.job_id} (seg.dcm)", str(SLICE), ct.source.instance_uids[SLICE], names,
                          str(voxels), str(saved), f"outbox: {DESTINATION}"]


def test_editor_errors_are_shown(node: Node, page, screenshots: Path) -> None:
    """Issue 8's bad input, each with its HTTP status and a message on the page: a series that is not on
    the node, a save with a label id nobody defined, a token that expired (at sign-in, on a save, on a
    slice change)."""
    # An unknown series: 404 with a clear message.
    page.goto(f"{node.url}/edit/1.2.3.999")
    with page.expect_response(lambda r: r.url.endswith("/api/edit/1.2.3.999")) as answer:
        sign_in(page, TOKENS["alice"])
    assert answer.value.status == 404
    page.wait_for_selector("body[data-error='404']")
    assert page.inner_text("#message") == "Not found: series 1.2.3.999 is not on this node (not in the spool)"
    assert page.locator("#workspace").is_hidden()
    page.screenshot(path=str(screenshots / "editor-unknown-series.png"))

    # An invalid token: 401, shown at the sign-in.
    page.evaluate("sessionStorage.clear()")
    page.goto(f"{node.url}/edit/{node.series_uid}")
    page.wait_for_selector(".message.info")
    assert page.inner_text("#message") == "Sign in with your API token to open this series."
    with page.expect_response(lambda r: r.url.endswith("/api/whoami")) as answer:
        sign_in(page, "not-a-token")
    assert answer.value.status == 401
    page.wait_for_selector(".message.error")
    assert page.inner_text("#message") == "Your token was not accepted (expired or invalid): sign in again."
    assert page.inner_text("#who") == ""
    assert page.locator("#workspace").is_hidden()

    # Signed in; then a label id nobody defined (400), then a token that expired (401): both shown.
    sign_in(page, TOKENS["bob"])
    page.wait_for_selector("body[data-ready='1']")
    page.evaluate("""() => {
        const S = window.segnodeEditor, plane = S.labels.get(S.k);
        S.original.set(S.k, plane.slice());
        plane[0] = 999;
        S.edited.add(S.k);
    }""")
    page.evaluate("document.getElementById('save').disabled = false")
    with page.expect_response(lambda r: r.url.endswith("/save")) as answer:
        page.click("#save")
    assert answer.value.status == 400
    page.wait_for_selector(".save-status.error")
    k = page.get_attribute("body", "data-slice")
    assert page.inner_text("#save-status") == (
        f"Not saved: slice {k} uses label id(s) 999, which are not in the label list: add them as labels first")
    assert page.inner_text("#who") == "signed in as bob"
    page.evaluate("sessionStorage.setItem('segnode.token', 'expired-token')")
    with page.expect_response(lambda r: r.url.endswith("/save")) as answer:
        page.click("#save")
    assert answer.value.status == 401
    page.wait_for_selector(".save-status.error >> text=expired")
    assert page.inner_text("#save-status") == (
        "Not saved: Your token was not accepted (expired or invalid): sign in again.")
    assert page.inner_text("#who") == ""  # signed out: the sign-in form is back
    assert page.locator("#token").is_visible()
    page.screenshot(path=str(screenshots / "editor-expired-token.png"))

    # A slice never fetched, with the token expired: 401, and the message says to sign in again.
    far = int(k) + 12
    with page.expect_response(lambda r: f"/image/{far}?" in r.url) as answer:
        page.locator("#slider").evaluate(f"(e) => {{ e.value = {far}; e.dispatchEvent(new Event('input')); }}")
    assert answer.value.status == 401
    page.wait_for_selector("#message.error")
    assert page.inner_text("#message") == "Your token was not accepted (expired or invalid): sign in again."
    assert page.get_attribute("body", "data-slice") == k  # the slice drawn is still the old one
    # Signed in again: the message goes, the slice asked for is drawn, the edit is still there to save.
    sign_in(page, TOKENS["bob"])
    page.wait_for_selector(f"body[data-slice='{far}']")
    assert page.locator("#message").is_hidden()
    assert page.get_attribute("body", "data-edited") == k


#: Issue 8's size: a 512 x 512 x 300 CT. Built (phantom, DICOM files, ingest, threshold job with a SEG) in
#: ~25 s on 2 cores.
LARGE = PhantomSpec(size=(512, 512, 300), spacing=(0.8, 0.8, 1.0))
#: Slider jumps to slices never fetched before (the editor prefetches 3 on each side of a slice shown).
JUMPS = (299, 5, 120, 70, 285, 100, 135, 200, 275, 85, 110, 60, 10, 205, 290, 125, 95)
#: The image row whose pixels are checked on every slice shown.
ROW_CHECKED = 256

SHOWN = """(j) => {
    const S = window.segnodeEditor, row = (id) => document.getElementById(id).getContext("2d")
        .getImageData(0, j, S.cols, 1).data.filter((_, i) => i % 4 === (id === "image" ? 0 : 3));
    return { slice: document.body.dataset.slice, label: document.getElementById("slice-label").textContent,
             hud: document.getElementById("hud").textContent, gray: Array.from(row("image")),
             alpha: Array.from(row("overlay")), window: S.window };
}"""


def _summary(timings: list[dict]) -> str:
    drawn = [t["ms"] for t in timings]
    frame = [t["frame"] for t in timings]
    waited = [t["input"] for t in timings]
    return (f"drawn median {statistics.median(drawn):.1f} ms, p95 {np.percentile(drawn, 95):.1f} ms, max "
            f"{max(drawn):.1f} ms (of which the browser's event dispatch median {statistics.median(waited):.1f} "
            f"ms); on screen (next frame) median {statistics.median(frame):.1f} ms, p95 "
            f"{np.percentile(frame, 95):.1f} ms, max {max(frame):.1f} ms")


@pytest.mark.slow
def test_slice_change_timings_on_a_large_series(tmp_path: Path, browser_context, screenshots: Path) -> None:
    """Prints slice-change times on a 512 x 512 x 300 CT, measured in the browser (performance.now(), from
    the input event to both planes drawn, and to the next animation frame): arrow keys and the wheel one
    slice at a time, slider jumps to slices never fetched, and the first load. Checks, on every slice
    shown, its index in the slider label and the HUD, and one image row and overlay row pixel by pixel."""
    from node.dicom.seg import read_seg

    built = time.perf_counter()
    with running_node(tmp_path, spec=LARGE) as large:
        built = time.perf_counter() - built
        job = large.store.get(large.job_id)
        labels = read_seg(Path(job.results) / "seg.dcm", Path(job.folder)).array
        ct = large.ct.array
        n, rows, columns = ct.shape
        assert (n, rows, columns) == (300, 512, 512)

        def check(k: int) -> None:
            """Slice k is the one on screen: index, image row (windowed as the editor does), overlay row."""
            shown = page.evaluate(SHOWN, ROW_CHECKED)
            low, scale = shown["window"]["center"] - shown["window"]["width"] / 2, 255 / shown["window"]["width"]
            gray = np.clip(np.floor((ct[k, ROW_CHECKED].astype(float) - low) * scale + 0.5), 0, 255)
            assert (shown["slice"], shown["label"], shown["hud"].split(" · ")[0]) == (
                str(k), f"{k + 1} / {n}", f"slice {k + 1} / {n}")  # numbered from 1 on screen
            assert shown["gray"] == gray.astype(int).tolist(), f"slice {k}: image row {ROW_CHECKED}"
            assert [a > 0 for a in shown["alpha"]] == (labels[k, ROW_CHECKED] > 0).tolist(), f"slice {k}: overlay"

        def measured(k: int) -> dict:
            page.wait_for_selector(f"body[data-slice='{k}']")
            check(k)
            return page.evaluate("window.segnodeEditor.timings.length") - 1

        def jump(k: int) -> int:
            page.locator("#slider").evaluate(f"(e) => {{ e.value = {k}; e.dispatchEvent(new Event('input')); }}")
            return measured(k)

        page = browser_context.new_page()
        page.goto(f"{large.url}/edit/{large.series_uid}")
        started = time.perf_counter()
        sign_in(page, TOKENS["alice"])
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        opened = time.perf_counter() - started
        first = page.evaluate("window.segnodeEditor.opened")
        check(n // 2)

        # Arrow keys, one slice at a time from the middle (waiting for each), then 30 presses over slices
        # never fetched without waiting: the requests left behind are aborted, the last slice is drawn.
        page.focus("#viewport")
        keys = []
        for k in range(n // 2 + 1, n // 2 + 41):
            page.keyboard.press("ArrowDown")
            keys.append(measured(k))
        jumps = [jump(20)]
        page.focus("#viewport")
        rushed = time.perf_counter()
        for _ in range(30):
            page.keyboard.press("ArrowDown")
        rushed_last = measured(50)
        rushed = time.perf_counter() - rushed

        # The wheel, one slice per notch, upwards from a far slice.
        jumps.append(jump(260))
        box = page.locator("#viewport").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        wheel = []
        for k in range(259, 219, -1):
            page.mouse.wheel(0, -100)
            wheel.append(measured(k))

        # Slider jumps to far slices never fetched.
        for k in JUMPS:
            jumps.append(jump(k))
        page.evaluate("new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
        timings = page.evaluate("window.segnodeEditor.timings")
        page.screenshot(path=str(screenshots / "editor-large-series.png"))

        # Reopened: the server has the series in memory.
        page.reload()
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        again = page.evaluate("window.segnodeEditor.opened")
        check(n // 2)
        page.close()

    keys, wheel, jumps = ([timings[i] for i in which] for which in (keys, wheel, jumps))
    rushed_last = timings[rushed_last]
    assert [t["k"] for t in jumps] == [20, 260, *JUMPS]
    assert not any(t["cached"] for t in jumps), [t["k"] for t in jumps if t["cached"]]
    print(f"\neditor on a {columns}x{rows}x{n} CT (phantom written, stored, segmented with a SEG in {built:.1f} s):")
    print(f"  first load: sign-in to first slice drawn {opened:.2f} s (in the browser: series info "
          f"{first['infoMs'] / 1000:.2f} s, first slice {first['firstSliceMs'] / 1000:.2f} s); reopened with "
          f"the series in the server's memory: {again['firstSliceMs']:.0f} ms")
    print(f"  arrow keys, {len(keys)} single steps ({sum(t['cached'] for t in keys)} prefetched): {_summary(keys)}")
    print(f"  wheel, {len(wheel)} single steps ({sum(t['cached'] for t in wheel)} prefetched): {_summary(wheel)}")
    print(f"  slider jumps to {len(jumps)} unfetched slices: {_summary(jumps)}")
    print(f"  30 arrow presses without waiting over unfetched slices: {rushed * 1000:.0f} ms until slice 50 was "
          f"drawn ({rushed_last['ms']:.1f} ms for its own request)")


def test_editor_versions_views_and_make_current(node: Node, page, screenshots: Path) -> None:
    """After alice's save (version 2): slices numbered from 1, the coronal and sagittal views (a click
    there goes to a slice), the Versions panel with the engine's version 1, version 1 shown in place of
    version 2 (read-only) and back, then made current again as version 3 by bob (version 2 kept)."""
    from node.dicom.seg import read_seg
    from node.dicom.series import read_series

    job = node.store.get(node.job_id)
    ct = read_series(Path(job.folder))
    base = read_seg(Path(job.results) / "seg.dcm", ct)
    v2_path = node.data_dir / "corrections" / node.series_uid / "v2.dcm"
    if not v2_path.exists():  # run on its own: version 2 as test_editor_paint_erase_save saves it
        save_version_2(node, base.array[SLICE])
    v2 = read_seg(v2_path, ct)
    n, rows, columns = ct.array.shape
    assert not np.array_equal(v2.array[SLICE], base.array[SLICE])  # test_editor_paint_erase_save's edit

    page.goto(f"{node.url}/edit/{node.series_uid}")
    sign_in(page, TOKENS["bob"])
    page.wait_for_selector("body[data-ready='1']")
    assert page.inner_text("#slice-label") == f"{n // 2 + 1} / {n}"
    assert page.inner_text("#hud").startswith(f"slice {n // 2 + 1} / {n} · ")
    items = page.locator("#versions li")
    assert [items.nth(i).get_attribute("data-version") for i in range(items.count())] == ["2", "1"]
    newest = items.nth(0).inner_text()
    assert newest.startswith("v2\nalice · ") and newest.endswith("\ncurrent")
    assert items.nth(0).get_attribute("class") == "current"
    assert items.nth(1).inner_text().startswith(f"v1\nengine (job {node.job_id}) · ")

    # The coronal and sagittal views through the middle, version 2's labels; a click goes to a slice.
    page.wait_for_function("() => document.body.dataset.coronal && document.body.dataset.sagittal")
    assert (page.get_attribute("body", "data-coronal"), page.get_attribute("body", "data-sagittal")) == (
        f"{rows // 2}:2", f"{columns // 2}:2")
    assert page.eval_on_selector("#coronal", "c => [c.width, c.height]") == [columns, n]
    assert page.eval_on_selector("#sagittal", "c => [c.width, c.height]") == [rows, n]
    head_up = ct.geometry.direction_matrix[2, 2] > 0
    box = page.locator("#coronal").bounding_box()
    row = n - 1 - SLICE if head_up else SLICE
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + (row + 0.5) * box["height"] / n)
    page.wait_for_selector(f"body[data-slice='{SLICE}']")
    assert page.inner_text("#slice-label") == f"{SLICE + 1} / {n}"
    page.screenshot(path=str(screenshots / "editor-views.png"))

    def overlay_alpha() -> np.ndarray:
        return np.array(page.evaluate("""() => {
            const c = document.getElementById('overlay');
            const rgba = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            return Array.from(rgba.filter((_, i) => i % 4 === 3));
        }""")).reshape(rows, columns)

    shown_v2 = overlay_alpha()
    # Version 1 in place of version 2: read-only, and T goes back.
    items.nth(1).locator("button.compare").click()
    page.wait_for_selector("body[data-viewing='1']")
    page.wait_for_function(f"() => window.segnodeEditor.compareLabels.has({SLICE})")
    compared = np.array(page.evaluate(f"Array.from(window.segnodeEditor.compareLabels.get({SLICE}))"))
    assert np.array_equal(compared.reshape(rows, columns), base.array[SLICE])
    assert np.array_equal(overlay_alpha() > 0, base.array[SLICE] > 0)
    assert np.array_equal(shown_v2 > 0, v2.array[SLICE] > 0)
    assert "showing version 1 (read-only" in page.inner_text("#hud")
    page.wait_for_function("() => document.body.dataset.coronal.endsWith(':1')")  # the views follow
    page.mouse.click(*voxel_point(page, X0, ROW, columns, rows))
    assert page.inner_text("#message").startswith("Version 1 is shown read-only")
    assert page.get_attribute("body", "data-edited") == ""
    page.screenshot(path=str(screenshots / "editor-compare.png"))
    page.keyboard.press("t")
    page.wait_for_selector("body[data-viewing='2']")
    assert np.array_equal(overlay_alpha() > 0, v2.array[SLICE] > 0)

    # Version 1 made current again: version 3, by bob; version 2 stays.
    page.locator("#versions li[data-version='1'] button.make-current").click()
    page.wait_for_selector(".save-status.ok")
    assert page.inner_text("#save-status").startswith("Version 1 is current again as version 3 (SEG ")
    page.wait_for_function("() => document.querySelectorAll('#versions li').length === 3")
    assert page.locator("#versions li.current").get_attribute("data-version") == "3"
    assert page.locator("#versions li[data-version='3']").inner_text().startswith("v3\nbob · ")
    page.wait_for_function(f"() => segnodeEditor.labels.has({SLICE}) && segnodeEditor.shown === {SLICE}")
    plane = np.array(page.evaluate(f"Array.from(segnodeEditor.labels.get({SLICE}))")).reshape(rows, columns)
    assert np.array_equal(plane, base.array[SLICE])
    v3_path = v2_path.with_name("v3.dcm")
    v3 = pydicom.dcmread(v3_path, stop_before_pixels=True)
    assert (str(v3.ContentCreatorName), v3.SeriesNumber) == ("bob", 3001)
    assert np.array_equal(read_seg(v3_path, ct).array, base.array)
    assert np.array_equal(read_seg(v2_path, ct).array, v2.array)  # nothing deleted
    page.screenshot(path=str(screenshots / "editor-made-current.png"))


def save_version_2(node: Node, plane: np.ndarray) -> None:
    """alice's correction of slice SLICE (a stroke of label 1) through the editor's API."""
    import httpx

    edited = plane.copy()
    edited[stroke(edited.shape, X0, X1, ROW, BRUSH)] = 1
    with httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {TOKENS['alice']}"},
                      trust_env=False) as http:
        info = http.get(f"/api/edit/{node.series_uid}").json()
        data = base64.b64encode(np.ascontiguousarray(edited, "<u2").tobytes()).decode()
        saved = http.post(f"/api/edit/{node.series_uid}/save", json={
            "base_version": info["version"], "encoding": "raw", "slices": {str(SLICE): data}})
    assert saved.json()["version"] == 2, saved.text

