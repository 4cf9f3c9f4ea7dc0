"""trainer/dcp_reader.py RowRangeReader: a DCP load that reads only the requested rows of each saved chunk (no
whole-chunk torch.load), checked against torch's own FileSystemReader on a resharded load (2 saved chunks -> 3
destination chunks, every request a partial row range) for a 2-D table and a 1-D per-row state."""

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.sharding_spec import ChunkShardingSpec

from hstu.trainer.dcp_reader import RowRangeReader

ROWS, DIM = 23, 5


@pytest.fixture()
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded(n_chunks, *size, fill=None):
    spec = ChunkShardingSpec(dim=0, placements=["rank:0/cpu"] * n_chunks)
    st = sharded_tensor.empty(spec, *size)
    for shard in st.local_shards():
        row0 = shard.metadata.shard_offsets[0]
        t = shard.tensor
        if fill is None:
            t.fill_(float("nan"))
        else:
            t.copy_(fill[row0:row0 + t.shape[0]])
    return st


def _gather(st, *size):
    out = torch.full(size, float("nan"))
    for shard in st.local_shards():
        row0 = shard.metadata.shard_offsets[0]
        out[row0:row0 + shard.tensor.shape[0]] = shard.tensor
    return out


def test_resharded_load_reads_only_the_requested_rows(group, tmp_path):
    table = torch.randn(ROWS, DIM)
    state = torch.rand(ROWS)
    path = str(tmp_path / "ckpt")
    dcp.save({"table": _sharded(2, ROWS, DIM, fill=table), "state": _sharded(2, ROWS, fill=state),
              "dense": torch.arange(7.0)}, checkpoint_id=path)

    def load(reader):
        target = {"table": _sharded(3, ROWS, DIM), "state": _sharded(3, ROWS), "dense": torch.zeros(7)}
        dcp.load(target, storage_reader=reader)
        return target

    reader = RowRangeReader(path)
    got = load(reader)
    want = load(dcp.FileSystemReader(path))
    assert torch.equal(_gather(got["table"], ROWS, DIM), table)
    assert torch.equal(_gather(got["state"], ROWS), state)
    assert torch.equal(_gather(want["table"], ROWS, DIM), table)  # torch's own reader agrees
    assert torch.equal(got["dense"], torch.arange(7.0))
    # 3 destination chunks over 2 saved ones: 4 partial row ranges per sharded tensor, + the dense tensor
    assert reader.direct_reads == 4 + 4 + 1 and reader.whole_reads == 0


def test_a_blob_that_is_not_a_plain_tensor_falls_back_to_the_whole_read(group, tmp_path, monkeypatch):
    import hstu.trainer.dcp_reader as dr

    path = str(tmp_path / "ckpt")
    table = torch.randn(ROWS, DIM)
    dcp.save({"table": _sharded(2, ROWS, DIM, fill=table)}, checkpoint_id=path)
    monkeypatch.setattr(dr, "raw_tensor_offset", lambda *a, **k: None)  # as if the blob were transformed
    reader = RowRangeReader(path)
    target = {"table": _sharded(3, ROWS, DIM)}
    dcp.load(target, storage_reader=reader)
    assert torch.equal(_gather(target["table"], ROWS, DIM), table)
    assert reader.direct_reads == 0 and reader.whole_reads == 4

