"""Browser tests drive Debian's Chromium (``/usr/bin/chromium``) through Playwright for Python; no
browser is ever downloaded. Skipped, with the reason, when Chromium or Playwright is missing
(``scripts/setup.sh`` installs both).

Screenshots go to ``test-output/browser/`` (gitignored) or ``$SEGNODE_TEST_OUTPUT``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
#: WebGL without a GPU, headless: ANGLE on SwiftShader (the "unsafe" flag allows it for WebGL content).
WEBGL_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
#: A laptop screen.
VIEWPORT = {"width": 1366, "height": 768}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    reason = None
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is absent (apt-get install chromium, or scripts/setup.sh)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright Python package is not installed (pip install -e '.[test]')"
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.browser)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def screenshots() -> Path:
    root = Path(os.environ.get("SEGNODE_TEST_OUTPUT", Path(__file__).parents[2] / "test-output")) / "browser"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def chromium(args: list[str]) -> Iterator[object]:
    """A headless Chromium with a fresh profile (a Playwright BrowserContext), closed and removed after."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="segnode-chromium-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), headless=True, args=args, viewport=VIEWPORT,
                accept_downloads=True)
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser_context() -> Iterator[object]:
    """A headless Chromium with a fresh profile; pages share it within a module."""
    with chromium(ARGS) as context:
        yield context


@pytest.fixture(scope="module")
def webgl_browser_context() -> Iterator[object]:
    """The same with WebGL (OHIF's cornerstone3D needs it): SwiftShader, Chromium's CPU renderer."""
    with chromium(ARGS + WEBGL_ARGS) as context:
        yield context
