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
services) and ``window.cornerstone``. The binary case's study also holds the node's RTSTRUCT: its
contours are checked as written and on the screen.

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
    #: The run's outputs (the binary case's study also gets the node's RTSTRUCT).
    outputs: tuple[str, ...] = ("seg",)


CASES = [
    Case("binary", TINY, {}, "BINARY", ("seg", "rtstruct")),
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
    #: The run's other DICOM outputs, by name (``rtstruct``).
    others: dict[str, Path]


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
        phantom, run = phantom_seg(tmp / case.name, case.spec, case.seg_options, case.outputs)
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
        for _, phantom, seg_path, run, *_ in made:
            others = [run.paths[name] for name in ("rtstruct",) if name in run.paths]
            for path in [*sorted(phantom["dicom"].glob("*.dcm")), seg_path, *others]:
                orthanc.rest_post("/instances", path.read_bytes())
        app = create_viewer_app(ohif_dist, orthanc.dicomweb_url, username=USER, password=PASSWORD)
        with serve_in_thread(app) as url:
            out = {}
            for case, _, seg_path, run, truth, numbers in made:
                seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
                others = {name: run.paths[name] for name in ("rtstruct",) if name in run.paths}
                out[case.name] = Study(case, str(seg.StudyInstanceUID), seg_path, seg, run.ct, truth, numbers,
                                       url, others)
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
    j, i = np.mgrid[0:expected.shape[1], 0:expected.shape[2]]  # row by row, as the plane is raveled
    voxels = np.stack([i.ravel(), j.ravel(), np.full(i.size, k), np.ones(i.size)])
    centres = (ct.geometry.affine @ voxels)[:3].T.tolist()
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


#: Most a pixel on a drawn contour may differ from the CT's grey blended with its ROI's colour (24: where
#: two ROIs' lines cross or share a boundary, the anti-aliased edges of both mix).
LINE_TOLERANCE = 24


def test_the_rtstruct_contours_are_drawn_at_their_place(studies: dict[str, Study], page, screenshots) -> None:
    """The node's RTSTRUCT (node/dicom/rtstruct.py) over the CT: every ROI with its name, colour and
    contours as written; on the slice with the most ROIs, each contour drawn through its own points in
    its colour, and nothing drawn away from the contours."""
    study = studies["binary"]
    rt = pydicom.dcmread(study.others["rtstruct"])
    names = {int(item.ROINumber): str(item.ROIName) for item in rt.StructureSetROISequence}
    written = {}
    for item in rt.ROIContourSequence:
        contours = sorted((np.round(np.asarray(c.ContourData, float).reshape(-1, 3), 3).tolist()
                           for c in item.ContourSequence), key=lambda c: (c[0][2], c[0][1], c[0][0], len(c)))
        color = tuple(int(v) for v in item.ROIDisplayColor)
        written[names[int(item.ReferencedROINumber)]] = (color, contours)
    page, problems = page
    problems.clear()
    page.goto(f"{study.viewer}/viewer?StudyInstanceUIDs={study.uid}")
    page.wait_for_function(f"() => {{ try {{ {VIEWPORT_JS} return !!viewport.getCurrentImageId(); }} "
                           "catch (e) { return false; } }")
    thumbnail = page.locator("[data-cy^=study-browser-thumbnail]").filter(
        has=page.locator("[data-cy=series-modality-label]", has_text="RTSTRUCT"))
    thumbnail.dblclick()
    page.get_by_role("button", name="Yes", exact=True).click()
    contours_js = """
        const rtSeg = s.segmentationService.getSegmentations().find(x => x.representationData.Contour);
        const geometries = rtSeg.representationData.Contour.geometryIds.map(id => cs.cache.getGeometry(id));
    """
    page.wait_for_function(f"""() => {{ try {{ {VIEWPORT_JS} {contours_js}
        return geometries.length > 0 && geometries.every(g => g && g.data)
               && s.segmentationService.getSegmentationRepresentations(viewportId).length === 1;
        }} catch (e) {{ return false; }} }}""")
    shown = page.evaluate(f"""() => {{ {VIEWPORT_JS} {contours_js}
        return geometries.map(g => [rtSeg.segments[g.data.segmentIndex].label, Array.from(g.data.color),
                                    g.data.contours.map(c => c.points.map(p => Array.from(p)))]); }}""")
    listed = {}
    for label, color, contours in shown:
        contours = sorted((np.round(np.asarray(c, float), 3).tolist() for c in contours),
                          key=lambda c: (c[0][2], c[0][1], c[0][0], len(c)))
        listed[label] = (tuple(color[:3]), contours)
    assert sorted(listed) == sorted(written) and len(written) == 21
    for name, (color, contours) in written.items():
        assert listed[name][0] == color, name
        assert len(listed[name][1]) == len(contours), name
        for ours, theirs in zip(contours, listed[name][1]):
            np.testing.assert_allclose(theirs, ours, atol=1e-3, err_msg=name)

    # On the screen: the slice with the most ROIs; contours drawn minus the CT alone.
    ct, uids = study.ct, list(study.ct.source.instance_uids)
    inverse = np.linalg.inv(ct.geometry.affine)
    by_k: dict[int, list[tuple[str, np.ndarray]]] = {}
    for name, (_, contours) in written.items():
        for contour in contours:
            points = np.asarray(contour)
            k = int(round((inverse @ np.append(points[0], 1.0))[2]))
            by_k.setdefault(k, []).append((name, points))
    k = max(by_k, key=lambda kk: len({name for name, _ in by_k[kk]}))
    drawn = page.evaluate(f"""async ([sop, contours]) => {{ {VIEWPORT_JS} {contours_js}
        await viewport.setImageIdIndex(viewport.getImageIds().findIndex(id => sopOf(id) === sop));
        const box = viewport.canvas.getBoundingClientRect();
        return {{shown: sopOf(viewport.getCurrentImageId()), box: [box.x, box.y, box.width, box.height],
                 segmentationId: rtSeg.segmentationId, indices: geometries.map(g => g.data.segmentIndex),
                 points: contours.map(c => c.map(p => viewport.worldToCanvas(p)))}}; }}""",
                          [uids[k], [points.tolist() for _, points in by_k[k]]])
    assert drawn["shown"] == uids[k]
    def show_contours(visible: bool) -> None:
        page.evaluate("""([id, indices, visible]) => { const s = window.services;
            const viewportId = s.viewportGridService.getActiveViewportId();
            for (const n of indices)
                s.segmentationService.setSegmentVisibility(viewportId, id, n, visible); }""",
                      [drawn["segmentationId"], drawn["indices"], visible])

    def drawn_contours() -> np.ndarray:  # the view once the contours are on it (drawn after the image)
        for _ in range(20):
            shot = settled_viewport(page, drawn["box"])
            if not np.array_equal(shot, ct_only):
                return shot
        raise AssertionError("the contours did not appear")

    settled_viewport(page, drawn["box"])
    show_contours(False)
    ct_only = settled_viewport(page, drawn["box"])
    show_contours(True)
    with_rt = drawn_contours()
    assert np.array_equal(settled_viewport(page, drawn["box"]), with_rt)
    Image.fromarray(with_rt).save(screenshots / f"ohif-rtstruct-slice-{k}.png")
    changed = np.abs(with_rt.astype(int) - ct_only.astype(int)).max(axis=2) > 3 * TOLERANCE
    assert changed.sum() > 200
    # Each contour through its own points, in its colour: at nearly every vertex a pixel of the ROI's colour
    # (or of another ROI whose contour runs there too and is drawn over it: a liver's hole is a vessel).
    # Two ROIs share a boundary (a liver's hole, a vessel's outline) up to the simplification tolerance
    # (0.4 voxel): whichever is drawn last covers the other within that much.
    world, canvas = by_k[k][0][1], np.asarray(drawn["points"][0])
    far = int(np.argmax(np.linalg.norm(world - world[0], axis=1)))
    px_per_mm = np.linalg.norm(canvas[far] - canvas[0]) / np.linalg.norm(world[far] - world[0])
    shared = 0.5 * px_per_mm * min(ct.geometry.spacing[:2]) + 2.0
    bands: dict[str, np.ndarray] = {}
    covers: dict[str, np.ndarray] = {}
    for (name, _), canvas in zip(by_k[k], drawn["points"]):
        band = polyline_band(np.asarray(canvas), changed.shape, 2.0)
        cover = polyline_band(np.asarray(canvas), changed.shape, shared)
        bands[name] = bands[name] | band if name in bands else band
        covers[name] = covers[name] | cover if name in covers else cover
    near = np.logical_or.reduce(list(bands.values()))
    for (name, _), canvas in zip(by_k[k], drawn["points"]):
        xy = np.asarray(canvas)
        hits = 0
        for x, y in xy:
            col, row = min(int(x), changed.shape[1] - 1), min(int(y), changed.shape[0] - 1)
            allowed = np.array([written[other][0] for other, cover in covers.items() if cover[row, col]],
                               float)
            around = (slice(max(row - 2, 0), row + 3), slice(max(col - 2, 0), col + 3))
            seen = with_rt[around].reshape(-1, 1, 3).astype(float)
            grey = ct_only[around].reshape(-1, 1, 3).astype(float)
            # An anti-aliased line pixel: the CT's grey blended with the colour at coverage a >= 0.5.
            towards = allowed[None] - grey
            a = ((seen - grey) * towards).sum(axis=2) / np.maximum((towards ** 2).sum(axis=2), 1e-9)
            residual = np.abs(seen - (grey + a[..., None] * towards)).max(axis=2)
            hits += bool(((a >= 0.5) & (residual <= LINE_TOLERANCE)).any())
        assert hits >= 0.9 * len(xy), (
            f"{name} on slice k={k}: {hits} of {len(xy)} vertices drawn in its colour")
    # Nothing drawn away from the contours.
    stray = changed & ~near
    assert stray.sum() <= 0.01 * changed.sum(), (
        f"{stray.sum()} of {changed.sum()} changed pixels off the contours")
    assert problems == []


def polyline_band(xy: np.ndarray, shape: tuple[int, int], width: float) -> np.ndarray:
    """Pixels (by their centres) within ``width`` of the closed polyline through canvas points ``xy``."""
    band = np.zeros(shape, bool)
    for a, b in zip(xy, np.roll(xy, -1, axis=0)):
        lo = np.clip(np.floor(np.minimum(a, b) - width - 1).astype(int), 0, None)
        hi = np.minimum(np.ceil(np.maximum(a, b) + width + 1).astype(int), (shape[1] - 1, shape[0] - 1))
        ys, xs = np.mgrid[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
        centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)
        ab = b - a
        t = np.clip(((centres - a) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
        inside = np.linalg.norm(centres - (a + t[:, None] * ab), axis=1) <= width
        band[ys.ravel()[inside], xs.ravel()[inside]] = True
    return band

