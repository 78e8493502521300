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


def test_dashboard_shows_the_job_and_takes_dropped_files(node: Node, page, screenshots: Path) -> None:
    page.goto(node.url + "/")
    page.wait_for_selector(".message.info")
    assert page.inner_text("#message") == "Sign in with your API token."
    sign_in(page, TOKENS["alice"])
    row = page.locator(f"#jobs tr[data-job='{node.job_id}']")
    row.wait_for()
    assert page.inner_text("#who") == "signed in as alice"
    cells = row.locator("td")
    assert cells.nth(2).inner_text() == "stow"
    assert cells.nth(3).inner_text() == "ct-threshold\nthreshold"
    assert cells.nth(4).inner_text() == "done"
    assert cells.nth(5).inner_text() == "done"
    assert cells.nth(6).inner_text().strip() == "100%"
    assert sorted(t.split(" ")[0] for t in cells.nth(7).locator("span span").all_inner_texts()) == [
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
        assert row.locator("td").nth(4).inner_text() == "failed"
        assert row.locator("td").nth(8).inner_text() == "missing_slices: slice 2 of 3 is missing"
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
    # An unknown series: 404 with a clear message.
    page.goto(f"{node.url}/edit/1.2.3.999")
    sign_in(page, TOKENS["alice"])
    page.wait_for_selector("body[data-error='404']")
    assert page.inner_text("#message") == "Not found: series 1.2.3.999 is not on this node (not in the spool)"
    assert page.locator("#workspace").is_hidden()
    page.screenshot(path=str(screenshots / "editor-unknown-series.png"))

    # An invalid token: 401, shown at the sign-in.
    page.evaluate("sessionStorage.clear()")
    page.goto(f"{node.url}/edit/{node.series_uid}")
    page.wait_for_selector(".message.info")
    assert page.inner_text("#message") == "Sign in with your API token to open this series."
    sign_in(page, "not-a-token")
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
    page.click("#save")
    page.wait_for_selector(".save-status.error")
    k = page.get_attribute("body", "data-slice")
    assert page.inner_text("#save-status") == (
        f"Not saved: slice {k} uses label id(s) 999, which are not in the label list: add them as labels first")
    page.evaluate("sessionStorage.setItem('segnode.token', 'expired-token')")
    page.click("#save")
    page.wait_for_selector(".save-status.error >> text=expired")
    assert page.inner_text("#save-status") == (
        "Not saved: Your token was not accepted (expired or invalid): sign in again.")
    page.screenshot(path=str(screenshots / "editor-expired-token.png"))


def test_slice_change_timings_on_a_large_series(tmp_path: Path, browser_context, screenshots: Path) -> None:
    """Prints slice-change times measured in the browser (performance.now(): request to drawn) on a
    256 x 256 x 160 phantom: keys one slice at a time (after the first, prefetched), and jumps."""
    with running_node(tmp_path, spec=PhantomSpec()) as large:
        page = browser_context.new_page()
        page.goto(f"{large.url}/edit/{large.series_uid}")
        started = time.perf_counter()
        sign_in(page, TOKENS["alice"])
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        opened = time.perf_counter() - started
        page.focus("#viewport")
        page.keyboard.press("Home")
        page.wait_for_selector("body[data-slice='0']")
        start = page.evaluate("window.segnodeEditor.timings.length")
        for k in range(1, 41):
            page.keyboard.press("ArrowDown")
            page.wait_for_selector(f"body[data-slice='{k}']")
        for k in (159, 80, 120, 10):
            page.locator("#slider").evaluate(f"(e) => {{ e.value = {k}; e.dispatchEvent(new Event('input')); }}")
            page.wait_for_selector(f"body[data-slice='{k}']")
        timings = page.evaluate("window.segnodeEditor.timings")[start:]
        # Keys held down over slices never fetched: requests left behind are aborted, the last one drawn.
        page.locator("#slider").evaluate("(e) => { e.value = 84; e.dispatchEvent(new Event('input')); }")
        page.wait_for_selector("body[data-slice='84']")
        page.focus("#viewport")
        rushed = time.perf_counter()
        for _ in range(30):
            page.keyboard.press("ArrowDown")
        page.wait_for_selector("body[data-slice='114']")
        rushed = time.perf_counter() - rushed
        last = page.evaluate("window.segnodeEditor.timings.at(-1)")
        page.screenshot(path=str(screenshots / "editor-large-series.png"))
        page.close()
    steps, jumps = timings[:40], timings[40:]
    step_ms = [t["ms"] for t in steps]
    print(f"\nslice change, 256x256x160 CT, {len(steps)} single steps: median {statistics.median(step_ms):.1f} ms, "
          f"max {max(step_ms):.1f} ms, {sum(t['cached'] for t in steps)} already prefetched")
    print("slice change, jumps (slider): " + ", ".join(f"{t['k']}: {t['ms']:.1f} ms" for t in jumps))
    print(f"sign-in to first slice drawn (server reads the series and its SEG once): {opened:.2f} s")
    print(f"30 key presses without waiting over unfetched slices: {rushed * 1000:.0f} ms until slice 114 was "
          f"drawn ({last['ms']:.1f} ms for its own request)")
    assert last["k"] == 114
    assert [t["k"] for t in timings] == [*range(1, 41), 159, 80, 120, 10]
