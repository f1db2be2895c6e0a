"""engines/huge_pages.py and the static decoder's use of it: tensors of 2 MiB or more are copied
onto madvise(MADV_HUGEPAGE)-d mappings in place (same tensor objects, same values, memory
2 MiB-aligned and advised), smaller ones and already-moved ones are left, a system without
transparent huge pages moves nothing and says why, and a decoder on huge pages computes
exactly what one on torch's own allocation computes, compiled or not. The speed is measured,
not tested: scripts/decode_split.py ``--huge-pages-ab`` (docs/performance.md, "Huge pages")."""

from __future__ import annotations

import copy

import pytest
import torch
from decode_helpers import greedy, tiny_phi
from torch import nn
from transformers import PhiForCausalLM

from vlm_ros.config import RuntimeConfig
from vlm_ros.engines import cpu_kernels
from vlm_ros.engines import huge_pages as thp
from vlm_ros.infer.decode import make_decoder
from vlm_ros.infer.static_decode import StaticDecoder

MIB = 2**20
PROMPT, STEPS, MAX_SEQ = 7, 12, 32

needs_thp = pytest.mark.skipif(
    thp.unavailable() is not None, reason=f"this host: {thp.unavailable()}"
)


def vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def phi_with_big_tensors() -> PhiForCausalLM:
    """A 2-layer Phi whose fc1/fc2 (4 MiB) and embedding/head (2.5 MiB) are big enough to move
    and whose attention projections (1 MiB) are not."""
    return tiny_phi(vocab_size=1280, hidden_size=512, intermediate_size=2048,
                    num_attention_heads=8, partial_rotary_factor=0.5)  # fmt: skip


@needs_thp
def test_place_moves_big_tensors_in_place_and_leaves_small_ones():
    layer = nn.Linear(1024, 1024)  # 4 MiB weight, 4 KiB bias
    weight, bias = layer.weight, layer.bias
    before = weight.detach().clone()
    old_address = weight.data_ptr()
    placement = thp.place(thp.module_tensors(layer))
    assert placement.reason is None
    assert (placement.tensors, placement.moved_bytes) == (1, 4 * MIB)
    assert layer.weight is weight and layer.bias is bias  # the same objects, new memory
    assert weight.data_ptr() != old_address and weight.data_ptr() % thp.HUGE_PAGE == 0
    assert torch.equal(weight, before)
    assert "hg" in vm_flags(weight.data_ptr())  # madvise(MADV_HUGEPAGE) on its mapping
    assert "hg" not in vm_flags(before.data_ptr())  # (torch's own allocation: not advised)
    assert bias.data_ptr() % thp.HUGE_PAGE != 0  # below 2 MiB: left where it was
    again = thp.place(thp.module_tensors(layer))  # a second decoder on the same weights
    assert (again.tensors, weight.data_ptr()) == (0, weight.data_ptr())
    twin = copy.deepcopy(layer)  # carries the mark, not the memory: moved again
    assert thp.place(thp.module_tensors(twin)).tensors == 1
    assert "1 tensors (4 MiB) placed" in placement.summary()


@needs_thp
def test_a_view_into_a_larger_buffer_is_left():
    """Moving a view would keep its buffer alive beside the copy: memory held twice."""
    buffer = torch.zeros(2048, 1024)
    half = buffer[:1024]  # 4 MiB, contiguous, but the storage is 8 MiB
    assert thp.place([half]).tensors == 0 and half.data_ptr() == buffer.data_ptr()


@needs_thp
def test_place_keeps_a_tied_weight_tied():
    embed = nn.Embedding(1024, 1024)
    head = nn.Linear(1024, 1024, bias=False)
    head.weight = embed.weight
    placement = thp.place([embed.weight, head.weight])
    assert placement.tensors == 1
    assert head.weight is embed.weight and embed.weight.data_ptr() % thp.HUGE_PAGE == 0


def test_no_transparent_huge_pages_moves_nothing_and_says_why(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(thp, "THP_SETTING", setting)
    layer = nn.Linear(1024, 1024)
    address = layer.weight.data_ptr()
    placement = thp.place(thp.module_tensors(layer))
    assert placement.tensors == 0 and layer.weight.data_ptr() == address
    assert "never" in placement.reason and "not used" in placement.summary()


@needs_thp
@torch.inference_mode()
def test_decoder_on_huge_pages_computes_what_torch_allocation_computes():
    lm = phi_with_big_tensors()
    plain_lm = cpu_kernels.copy_structure(lm, lambda t: t.clone())  # torch's own allocation
    embeds = torch.randn(1, PROMPT, 512, generator=torch.Generator().manual_seed(1))
    fc1 = lm.model.layers[0].mlp.fc1.weight
    # the same kernels in both: auto times its GEMVs per load and may pick differently
    huge = StaticDecoder(lm, MAX_SEQ, cpu_linear="inductor")
    plain = StaticDecoder(plain_lm, MAX_SEQ, huge_pages=False, cpu_linear="inductor")
    # fc1, fc2 per layer, embedding, head; the KV cache (2x2 x 32 KiB) is too small to move
    assert huge.huge_pages.tensors == 6 and plain.huge_pages is None
    assert fc1.data_ptr() % thp.HUGE_PAGE == 0  # the model's own module: moved, not copied
    assert huge.lm.model.layers[0].mlp.fc1.weight.data_ptr() == fc1.data_ptr()
    assert plain_lm.model.layers[0].mlp.fc1.weight.data_ptr() % thp.HUGE_PAGE != 0
    tokens, logits = greedy(huge, embeds, STEPS)
    plain_tokens, plain_logits = greedy(plain, embeds, STEPS)
    assert tokens == plain_tokens and torch.equal(logits, plain_logits)


@needs_thp
@torch.inference_mode()
def test_compiled_step_on_huge_pages_and_the_cache_moved():
    """Compiled after the move (the addresses it binds are the huge-page ones); a cache long
    enough to be moved too."""
    lm = phi_with_big_tensors()
    plain_lm = cpu_kernels.copy_structure(lm, lambda t: t.clone())
    embeds = torch.randn(1, PROMPT, 512, generator=torch.Generator().manual_seed(1))
    long = 1024  # keys [1, 8, 1024, 64] float32: 2 MiB per layer and kind
    compiled = StaticDecoder(lm, long, compile=True, cpu_linear="torch")
    assert compiled.compiled, compiled.compile_refused
    assert compiled.huge_pages.tensors == 6 + 4
    assert all(t.data_ptr() % thp.HUGE_PAGE == 0
               for layer in compiled.cache.layers for t in (layer.keys, layer.values))  # fmt: skip
    plain = StaticDecoder(plain_lm, long, fast_step=False, huge_pages=False)
    tokens, logits = greedy(compiled, embeds, STEPS)
    plain_tokens, plain_logits = greedy(plain, embeds, STEPS)
    assert tokens == plain_tokens
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-4)


@needs_thp
def test_runtime_setting_reaches_the_decoder():
    lm = phi_with_big_tensors()
    with torch.inference_mode():
        off = make_decoder(lm, RuntimeConfig(max_seq_len=MAX_SEQ, huge_pages=False))
        assert off.huge_pages is None
        assert lm.model.layers[0].mlp.fc1.weight.data_ptr() % thp.HUGE_PAGE != 0
        on = make_decoder(lm, RuntimeConfig(max_seq_len=MAX_SEQ))
        assert on.huge_pages.tensors == 6
