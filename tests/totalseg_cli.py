"""Run TotalSegmentator's own command line (``TotalSegmentator -i ... -o ...``) on the node's CPU torch.

The ``TotalSegmentator`` entry point imports torchvision through timm; PyPI's CUDA torchvision fails at
import on the CPU build of torch (``operator torchvision::nms does not exist``). This wrapper installs
the same stub the node does (:func:`node.segment.totalseg.neutralise_torchvision`) and then calls the
CLI's ``main`` unchanged: ``python -m tests.totalseg_cli -i in.nii.gz -o out.nii.gz --ml ...``.
"""

from __future__ import annotations

import sys


def main() -> int:
    from node.segment.totalseg import neutralise_torchvision

    neutralise_torchvision()
    from totalsegmentator.bin.TotalSegmentator import main as cli_main

    sys.argv = ["TotalSegmentator", *sys.argv[1:]]
    result = cli_main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
