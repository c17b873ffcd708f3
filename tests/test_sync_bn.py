"""--sync-bn: each mode gives every SyncBatchNorm the intended process group (4 gloo processes:
the groups' members, and a real collective over each group); flag checks and defaults."""
import json

import pytest

from common.errors import UserError
from tests.helpers import ok, run


@pytest.mark.full
def test_groups_of_each_mode(tmp_path):
    out = tmp_path / "groups"
    ok(run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
            "tests/sync_bn_check.py", out], timeout=240))
    for rank in range(4):
        got = json.loads((tmp_path / f"groups.{rank}.json").read_text())
        expected = {"global": [0, 1, 2, 3], "node": [rank % 2, rank % 2 + 2],  # hosts alternate
                    "2": [rank // 2 * 2, rank // 2 * 2 + 1], "1": [rank]}
        for mode, members in expected.items():
            assert got[mode]["ranks"] == [members, members], (rank, mode)  # both BN layers
            assert got[mode]["sum"] == sum(members), (rank, mode)


def test_defaults_and_bad_values():
    import moco
    import simclr
    assert simclr.get_args(["--data", "synthetic"]).sync_bn == "global"
    assert moco.get_args(["--data", "synthetic"]).sync_bn == "off"  # MoCo: its shuffled BN
    assert simclr.get_args(["--data", "synthetic", "--sync-bn", "8"]).sync_bn == "8"
    for bad in ("0", "nodes", "-2"):
        with pytest.raises(UserError, match="global, node, off or a group size"):
            simclr.get_args(["--data", "synthetic", "--sync-bn", bad])
