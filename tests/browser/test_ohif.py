"""segnode's DICOM-SEG in the real OHIF viewer, where radiologists review it.

OHIF is npm ``@ohif/app`` 3.13.2's prebuilt ``dist/`` (``scripts/setup.sh`` fetches it once into
``.cache/ohif/``), served by :mod:`node.web.viewer` (what ``segnode viewer`` runs) with its own
``app-config.js`` and a same-origin proxy to a real Orthanc's DICOMweb, Basic credentials added by the
proxy. Headless Debian Chromium draws OHIF's WebGL with SwiftShader.

Each case's study goes the node's real way: a phantom's CT series, the pipeline with the ``labelmap``
engine fed the phantom's exact labels, the ``seg`` output (node/dicom/seg_write.py); CT and SEG stored
into one Orthanc. The cases (:data:`CASES`): the TINY phantom's SEG as the node writes it (BINARY) and as
a LABELMAP, and the node's SEG on grids whose frames are not whole bytes (291 x 227 and 127 x 127, where
the node writes LABELMAP by itself). In OHIF, one page for all cases, each SEG is opened as a user does
(double-click its thumbnail, confirm the prompt), then read through ``window.services`` (OHIF's
services) and ``window.cornerstone``.

Screenshots: ``test-output/browser/ohif-<case>-*.png``.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from node.dicom.codes import cielab_to_rgb
from node.dicom.seg import parse_seg
from node.nifti import read_nifti
from node.phantom import CLASSES, TINY, PhantomSpec
from node.volume import Volume
from node.web.viewer import DEFAULT_DIST, OHIF_VERSION, create_viewer_app
from tests.integration.test_outbox import PASSWORD, USER, SecureOrthanc
from tests.phantom_seg import phantom_seg
from tests.servers import serve_in_thread

OHIF_DIST = Path(os.environ.get("SEGNODE_OHIF_DIST", DEFAULT_DIST))
#: Playwright's wait for anything OHIF does (SwiftShader's first frames can be slow on a busy machine).
TIMEOUT_MS = 90_000
#: Most a rendered channel may differ from the expected blend at a voxel centre: both are 8-bit and
#: the blend of two 8-bit values is rounded (measured: at most 0.5 with SwiftShader).
TOLERANCE = 2

#: Before any page script: record what OHIF shows the user through its notification, viewport
#: dialog and modal services (wrapped when OHIF publishes them as ``window.services``), and every
#: toast that enters the DOM (sonner's ``[data-sonner-toast]``), so nothing that disappears is missed.
RECORDER = """
(() => {
  const shown = window.__segnodeShown = [];
  let services;
  Object.defineProperty(window, 'services', {configurable: true, get: () => services, set: value => {
    services = value;
    for (const name of ['uiNotificationService', 'uiViewportDialogService', 'uiModalService']) {
      const service = value && value[name];
      if (!service || service.__segnodeWrapped) continue;
      const show = service.show.bind(service);
      service.show = (options = {}) => {
        const text = x => (typeof x === 'string' ? x : x === undefined ? '' : String(x));
        shown.push({service: name, type: text(options.type), title: text(options.title),
                    message: text(options.message)});
        return show(options);
      };
      service.__segnodeWrapped = true;
    }
  }});
  new MutationObserver(records => {
    for (const record of records) for (const node of record.addedNodes) {
      if (node.nodeType !== 1) continue;
      const selector = '[data-sonner-toast]';
      const toasts = node.matches(selector) ? [node] : node.querySelectorAll(selector);
      for (const toast of toasts) shown.push({service: 'toast', type: toast.getAttribute('data-type') || '',
                                              title: '', message: toast.textContent});
    }
  }).observe(document, {childList: true, subtree: true});
})();
"""

#: The active viewport (a cornerstone3D StackViewport) and OHIF's segmentation service.
VIEWPORT_JS = """
const s = window.services, cs = window.cornerstone;
const viewportId = s.viewportGridService.getActiveViewportId();
const viewport = s.cornerstoneViewportService.getCornerstoneViewport(viewportId);
const segmentation = s.segmentationService.getSegmentations()[0];
const sopOf = imageId => cs.metaData.get('generalImageModule', imageId).sopInstanceUID;
const colorOf = n => s.segmentationService.getSegmentColor(viewportId, segmentation.segmentationId, +n);
"""


@dataclass(frozen=True)
class Case:
    name: str
    spec: PhantomSpec
    #: The rule's ``stage_options["seg"]`` (none: the node's defaults).
    seg_options: dict[str, Any]
    #: The SegmentationType the node writes.
    kind: str


CASES = [
    Case("binary", TINY, {}, "BINARY"),
    Case("labelmap", TINY, {"type": "LABELMAP", "series_description": "segnode SEG LABELMAP"}, "LABELMAP"),
    # Rows x Columns not a multiple of 8: the node writes LABELMAP by itself (BINARY frames would start
    # inside a byte: OHIF fails to load 291 x 227 and shears 127 x 127).
    Case("291x227", PhantomSpec(size=(227, 291, 40), spacing=(0.9, 0.7, 6.0), seed=1), {}, "LABELMAP"),
    Case("127x127", PhantomSpec(size=(127, 127, 40), spacing=(1.6, 1.6, 6.0), seed=2), {}, "LABELMAP"),
]


@dataclass
class Study:
    case: Case
    uid: str
    seg_path: Path
    seg: pydicom.Dataset
    ct: Volume
    #: The phantom's exact label map (what the labelmap engine was given), [k, j, i].
    truth: np.ndarray
    #: Segment number of each label id (0 for the background).
    numbers: np.ndarray
    viewer: str


@dataclass
class Viewer:
    study: Study
    page: Any
    problems: list[str]


@pytest.fixture(scope="module")
def ohif_dist() -> Path:
    if not (OHIF_DIST / "index.html").is_file():
        if shutil.which("npm") is None:
            pytest.skip("npm is absent, so scripts/setup.sh could not fetch OHIF")
        pytest.fail(f"OHIF {OHIF_VERSION} is not in {OHIF_DIST}: run scripts/setup.sh (make setup)")
    return OHIF_DIST


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, ohif_dist: Path,
            _exiting_servers) -> Iterator[dict[str, Study]]:
    """Every case's CT and SEG in one Orthanc, behind one ``segnode viewer`` app."""
    tmp = tmp_path_factory.mktemp("ohif")
    made = []
    for case in CASES:
        phantom, run = phantom_seg(tmp / case.name, case.spec, case.seg_options)
        seg_path = run.paths["seg"]
        parsed = parse_seg(seg_path)
        assert parsed.segmentation_type == case.kind, case.name
        numbers = np.zeros(65536, np.uint16)
        for segment in parsed.segments.values():
            numbers[segment.label_id] = segment.number
        truth = read_nifti(phantom["labels"]).array
        assert np.array_equal(run.labels.array, truth)
        made.append((case, phantom, seg_path, run, truth, numbers))
    orthanc = SecureOrthanc(workdir=tmp / "orthanc")
    orthanc.start()
    try:
        for _, phantom, seg_path, *_ in made:
            for path in [*sorted(phantom["dicom"].glob("*.dcm")), seg_path]:
                orthanc.rest_post("/instances", path.read_bytes())
        app = create_viewer_app(ohif_dist, orthanc.dicomweb_url, username=USER, password=PASSWORD)
        with serve_in_thread(app) as url:
            out = {}
            for case, _, seg_path, run, truth, numbers in made:
                seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
                out[case.name] = Study(case, str(seg.StudyInstanceUID), seg_path, seg, run.ct, truth, numbers,
                                       url)
            assert len({study.uid for study in out.values()}) == 3  # the TINY cases share their study
            yield out
    finally:
        _exiting_servers.add(orthanc)


@pytest.fixture(scope="module")
def page(studies: dict[str, Study], webgl_browser_context) -> Iterator[tuple[Any, list[str]]]:
    """One OHIF page for every case, and what went wrong on it (cleared per case)."""
    origin = next(iter(studies.values())).viewer
    page = webgl_browser_context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and problems.append(f"console error: {msg.text}"))

    def only_the_viewer(route) -> None:  # nothing may leave the viewer's origin (it proxies Orthanc)
        if route.request.url.startswith(origin + "/"):
            route.continue_()
        else:
            problems.append(f"request off the viewer's origin: {route.request.url}")
            route.abort()

    page.route("**/*", only_the_viewer)
    page.add_init_script(RECORDER)
    try:
        yield page, problems
    finally:
        page.close()


@pytest.fixture(scope="module", params=CASES, ids=[case.name for case in CASES])
def viewer(request, studies: dict[str, Study], page, screenshots: Path) -> Viewer:
    """OHIF on the case's study with its SEG opened the way a user opens it."""
    study = studies[request.param.name]
    page, problems = page
    problems.clear()
    page.goto(f"{study.viewer}/viewer?StudyInstanceUIDs={study.uid}")
    page.wait_for_function(f"() => {{ try {{ {VIEWPORT_JS} return !!viewport.getCurrentImageId(); }} "
                           "catch (e) { return false; } }")
    page.screenshot(path=screenshots / f"ohif-{study.case.name}-ct.png")

    thumbnail = page.locator("[data-cy^=study-browser-thumbnail]").filter(
        has=page.locator("[data-cy=series-modality-label]", has_text="SEG")).filter(
        has=page.get_by_text(str(study.seg.SeriesDescription), exact=True))
    description = thumbnail.locator("[data-cy=series-description-label]").inner_text()
    assert description == str(study.seg.SeriesDescription)
    thumbnail.dblclick()
    page.get_by_text("Do you want to open this Segmentation?").wait_for()
    page.get_by_role("button", name="Yes", exact=True).click()
    page.wait_for_function(f"""() => {{ try {{ {VIEWPORT_JS}
        const labelmap = segmentation.representationData.Labelmap;
        return s.segmentationService.getSegmentationRepresentations(viewportId).length === 1
               && labelmap.imageIds.every(id => cs.cache.getImage(id));
        }} catch (e) {{ return false; }} }}""")
    page.screenshot(path=screenshots / f"ohif-{study.case.name}-seg-opened.png")
    return Viewer(study, page, problems)


def seg_segments(seg: pydicom.Dataset) -> dict[int, tuple[str, tuple[int, int, int]]]:
    """Segment number -> (label, RecommendedDisplayCIELabValue as 8-bit sRGB), from the SEG itself."""
    segments = {}
    for item in seg.SegmentSequence:
        lab = tuple(int(v) for v in item.RecommendedDisplayCIELabValue)
        segments[int(item.SegmentNumber)] = (str(item.SegmentLabel), cielab_to_rgb(lab))
    return segments


def test_every_segment_is_listed_with_its_label_and_colour(viewer: Viewer, screenshots) -> None:
    page, study = viewer.page, viewer.study
    expected = seg_segments(study.seg)
    if study.case.kind == "LABELMAP":
        # The background (pixel value 0) is described, by the last item (every LABELMAP pixel value must
        # be, PS3.3 C.8.20.2.3.3); OHIF lists it, with pixel value 0's colour: none, nothing is drawn.
        assert [int(item.SegmentNumber) for item in study.seg.SegmentSequence][-1] == 0
        assert expected.pop(0) == ("Background", (0, 0, 0))
        background = {0: ("Background", (0, 0, 0, 0))}
    else:
        background = {}
    assert sorted(expected) == list(range(1, 22)) and len(np.unique(study.truth)) - 1 == 21
    for label, rgb in expected.values():  # the SEG's colours are the classes' own (no round-trip drift)
        assert rgb == next(c.color for c in CLASSES.values() if c.name == label), label
    expected_rgba = {n: (label, (*rgb, 255)) for n, (label, rgb) in expected.items()} | background

    # OHIF's segmentation service: one segmentation, the SEG's series, every segment and its colour.
    state = page.evaluate(f"""() => {{ {VIEWPORT_JS}
        return {{count: s.segmentationService.getSegmentations().length, label: segmentation.label,
                 segments: Object.values(segmentation.segments).map(x => [x.segmentIndex, x.label,
                                                                          colorOf(x.segmentIndex)])}};
    }}""")
    assert (state["count"], state["label"]) == (1, str(study.seg.SeriesDescription))
    listed = {index: (label, tuple(color)) for index, label, color in state["segments"]}
    assert listed == expected_rgba

    # The segmentation panel: one row per segment, its number, label and colour dot.
    page.locator("[data-cy=panelSegmentation-btn]").click()
    rows = page.locator("[data-cy=data-row]")
    rows.nth(len(expected_rgba) - 1).wait_for()
    shown = {}
    for row in rows.all():
        number = int(row.inner_text().split()[0])  # the row starts with the segment's number
        dot = row.locator("[data-cy=data-row-colorhex]").evaluate("e => getComputedStyle(e).backgroundColor")
        values = [float(v) for v in dot.split("(")[1].rstrip(")").split(",")]  # rgb(r, g, b) or rgba(...)
        rgba = (*(int(v) for v in values[:3]), round(255 * values[3]) if len(values) == 4 else 255)
        shown[number] = (row.locator("[data-cy=data-row-title]").inner_text(), rgba)
    # The panel's dot leaves out the alpha: the background's shows black (it colours no pixel).
    assert shown == {n: (label, (*rgba[:3], 255)) for n, (label, rgba) in expected_rgba.items()}
    page.screenshot(path=screenshots / f"ohif-{study.case.name}-segments-panel.png")


def test_the_overlay_lands_on_the_right_slices_and_pixels(viewer: Viewer, screenshots) -> None:
    page, study = viewer.page, viewer.study
    ct, uids = study.ct, list(study.ct.source.instance_uids)
    expected = study.numbers[study.truth]  # segment numbers, [k, j, i]

    # The data OHIF renders: one labelmap image per CT image; each must hold exactly the segment
    # numbers of the CT slice it references (found by that slice's SOP Instance UID).
    images = page.evaluate(f"""() => {{ {VIEWPORT_JS}
        return segmentation.representationData.Labelmap.imageIds.map(id => {{
            const image = cs.cache.getImage(id), pixels = image.getPixelData();
            let text = ''; for (let n = 0; n < pixels.length; n++) text += String.fromCharCode(pixels[n]);
            return {{sop: sopOf(image.referencedImageId), rows: image.rows, columns: image.columns,
                     type: pixels.constructor.name, pixels: btoa(text)}};
        }}); }}""")
    assert sorted(image["sop"] for image in images) == sorted(uids)
    for image in images:
        k = uids.index(image["sop"])
        assert (image["rows"], image["columns"], image["type"]) == (*expected.shape[1:], "Uint8Array")
        pixels = np.frombuffer(base64.b64decode(image["pixels"]), np.uint8).reshape(expected.shape[1:])
        np.testing.assert_array_equal(pixels, expected[k], err_msg=f"slice k={k}")

    # What the user sees: go to the slice showing the most segments, then compare every voxel centre
    # on the screen with the CT alone blended with its segment's colour at OHIF's fill opacity.
    k = int(np.argmax([len(np.unique(plane)) for plane in expected]))
    centres = [list(ct.geometry.affine @ np.array([i, j, k, 1.0]))[:3]
               for j in range(expected.shape[1]) for i in range(expected.shape[2])]
    view = page.evaluate(f"""async ([sop, centres]) => {{ {VIEWPORT_JS}
        await viewport.setImageIdIndex(viewport.getImageIds().findIndex(id => sopOf(id) === sop));
        const representation = s.segmentationService.getSegmentationRepresentations(viewportId)[0];
        const box = viewport.canvas.getBoundingClientRect();
        return {{shown: sopOf(viewport.getCurrentImageId()), fillAlpha: representation.styles.fillAlpha,
                 outlineOpacity: representation.styles.outlineOpacity ?? 1,
                 colors: Object.fromEntries(Object.keys(segmentation.segments).map(n => [n, colorOf(n)])),
                 box: [box.x, box.y, box.width, box.height], ratio: window.devicePixelRatio,
                 points: centres.map(p => viewport.worldToCanvas(p))}}; }}""", [uids[k], centres])
    assert view["shown"] == uids[k]
    assert view["ratio"] == 1
    with_seg = settled_viewport(page, view["box"])
    set_visibility(page, False)
    ct_only = settled_viewport(page, view["box"])
    set_visibility(page, True)
    assert np.array_equal(settled_viewport(page, view["box"]), with_seg)
    Image.fromarray(with_seg).save(screenshots / f"ohif-{study.case.name}-seg-slice-{k}.png")
    Image.fromarray(ct_only).save(screenshots / f"ohif-{study.case.name}-ct-slice-{k}.png")

    alpha = float(view["fillAlpha"])
    assert 0.2 <= alpha <= 0.8, alpha  # OHIF's default is 0.5: the fill must show, over visible CT
    # Each segment's colour as the SEG itself recommends it (not OHIF's table: a table that had each
    # segment's colour on the wrong pixel value would pass), and OHIF's table agrees.
    colors = np.zeros((65536, 3))
    for number, (_, rgb) in seg_segments(study.seg).items():
        colors[number] = rgb
        assert number == 0 or tuple(view["colors"][str(number)][:3]) == rgb, number
    xy = np.floor(np.array(view["points"])).astype(int)  # the pixel holding each voxel centre
    assert (xy >= 0).all() and (xy[:, 0] < with_seg.shape[1]).all() and (xy[:, 1] < with_seg.shape[0]).all()
    numbers = expected[k].reshape(-1)
    seen, grey = with_seg[xy[:, 1], xy[:, 0]].astype(float), ct_only[xy[:, 1], xy[:, 0]].astype(float)
    blend = np.where(numbers[:, None] > 0, (1 - alpha) * grey + alpha * colors[numbers], grey)
    wrong = np.abs(seen - blend).max(axis=1) > TOLERANCE
    # OHIF draws each segment's outline (opaque, 3 screen pixels) along its edges inside it: where voxels
    # are only 3-4 pixels wide on the screen (291 x 227), the centres of a segment's two outermost rings
    # of voxels lie on its outline. Those show their own segment's colour, opaque; never a neighbour's
    # (a one-voxel shift still fails).
    plane = expected[k]
    edges = np.zeros(plane.shape, bool)
    edges[:, 1:] |= plane[:, 1:] != plane[:, :-1]
    edges[:, :-1] |= plane[:, :-1] != plane[:, 1:]
    edges[1:] |= plane[1:] != plane[:-1]
    edges[:-1] |= plane[:-1] != plane[1:]
    rings = ndimage.binary_dilation(edges, structure=np.ones((3, 3), bool)).reshape(-1)
    outline = float(view["outlineOpacity"])
    on_outline = np.abs(seen - ((1 - outline) * grey + outline * colors[numbers])).max(axis=1) <= TOLERANCE
    wrong &= ~(rings & (numbers > 0) & on_outline)
    examples = [divmod(int(n), expected.shape[2])[::-1] for n in np.flatnonzero(wrong)[:5]]
    assert not wrong.any(), f"slice k={k}: {wrong.sum()} of {wrong.size} voxel centres off, (i, j) {examples}"
    # The check can tell: most segment voxels differ from the CT alone, and a one-voxel shift would fail.
    assert len(np.unique(numbers)) >= 10
    assert (np.abs(seen - grey).max(axis=1)[numbers > 0] > 3 * TOLERANCE).mean() > 0.95
    assert (expected[k][:, 1:] != expected[k][:, :-1]).sum() > 100


def test_no_error_appears(viewer: Viewer, screenshots) -> None:
    shown = viewer.page.evaluate("() => window.__segnodeShown")
    # The one thing OHIF showed: its question before opening the SEG (no error, no warning).
    assert [(x["service"], x["type"], x["message"]) for x in shown] == [
        ("uiViewportDialogService", "info", "Do you want to open this Segmentation?")], shown
    assert viewer.page.locator("[data-sonner-toast]").count() == 0
    assert viewer.problems == []
    viewer.page.screenshot(path=screenshots / f"ohif-{viewer.study.case.name}-final.png")


def set_visibility(page, visible: bool) -> None:
    """Show or hide every segment, as the panel's eye buttons do."""
    page.evaluate(f"""(visible) => {{ {VIEWPORT_JS}
        for (const n of Object.keys(segmentation.segments))
            s.segmentationService.setSegmentVisibility(viewportId, segmentation.segmentationId, +n, visible);
    }}""", visible)


def settled_viewport(page, box: list[float], tries: int = 40) -> np.ndarray:
    """The viewport's canvas as RGB once two screenshots in a row (after animation frames) agree."""
    clip = dict(zip(("x", "y", "width", "height"), box))
    previous = None
    for _ in range(tries):
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB"))
        if previous is not None and np.array_equal(shot, previous):
            return shot
        previous = shot
    raise AssertionError(f"the viewport did not settle in {tries} screenshots")
