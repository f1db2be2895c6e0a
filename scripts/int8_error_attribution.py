"""Where dynamic int8's loss comes from (issue 17): weight rounding (per tensor / per channel)
and activation rounding (per tensor, 8-bit, or 7-bit as fbgemm's reduce_range does), each alone,
fake-quantized in float32 Linear layers, then torch.ao's dynamic int8 itself with and without
reduce_range. Greedy agreement over 16 tokens and first-step logit error over the logit range,
against the float32 static decoder, on a bench preset's random weights, one thread.

    .venv/bin/python scripts/int8_error_attribution.py small   # or tiny
"""

import copy
import sys

import torch
from torch import nn

from vlm_ros.bench.measure import PRESETS, build_model, prompt_ids
from vlm_ros.infer import decode
from vlm_ros.infer.fidelity import prefix_agreement
from vlm_ros.infer.static_decode import StaticDecoder

torch.set_num_threads(1)
preset = sys.argv[1]
m = build_model(preset, "cpu", torch.float32)
ids = prompt_ids(m, PRESETS[preset].text_tokens)
size = int(m.vision_config.image_size)
pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def fq_weight(w, per_channel):
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
    s = amax.clamp(min=1e-12) / 127
    return torch.round(w / s).clamp(-127, 127) * s


def fq_act(x, levels):
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    s = (hi - lo).clamp(min=1e-12) / (levels - 1)
    zp = torch.round(-lo / s)
    return (torch.round(x / s + zp).clamp(0, levels - 1) - zp) * s


class FQ(nn.Module):
    def __init__(self, lin, w_mode, a_levels):
        super().__init__()
        self.lin = lin
        self.a = a_levels
        if w_mode:
            lin.weight.data = fq_weight(lin.weight.data, w_mode == "channel")

    def forward(self, x):
        if self.a:  # per tensor: the dynamic kernel quantizes each call's whole input
            x = fq_act(x, self.a)
        return self.lin(x)


def run(lm):
    dec = StaticDecoder(lm, 400, cpu_linear="torch")
    with torch.inference_mode():
        img = m.encode_images(pixels)
        emb = decode.splice_image(ids, img, m.embed_tokens, m.num_image_tokens)
        logits = [dec.prefill(emb)]
        toks = [int(logits[0].argmax())]
        for _ in range(15):
            logits.append(dec.decode_one_token(torch.tensor([[toks[-1]]])))
            toks.append(int(logits[-1].argmax()))
    return toks, logits[0][0]


ref_t, ref_l = run(m.language_model)
rng = float(ref_l.max() - ref_l.min())
out = {}
for name, w, a in [
    ("w per-tensor", "tensor", 0),
    ("w per-channel", "channel", 0),
    ("a 8-bit per-tensor", None, 256),
    ("a 7-bit (reduce_range)", None, 128),
    ("w per-tensor + a 7-bit", "tensor", 128),
]:
    lm = copy.deepcopy(m.language_model)
    for parent in list(lm.modules()):
        for cn, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, cn, FQ(child, w, a))
    t, logits = run(lm)
    out[name] = (prefix_agreement(ref_t, t), float((logits - ref_l).abs().max()) / rng)
    print(name, out[name], flush=True)
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear  # noqa: E402

from vlm_ros.infer.static_decode import quantize_int8  # noqa: E402

for reduce_range in (True, False):  # torch.ao's dynamic Linear hard-codes True

    def forward(self, x, reduce_range=reduce_range):
        packed = self._packed_params._packed_params
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=reduce_range).to(x.dtype)

    DynamicLinear.forward = forward
    t, logits = run(quantize_int8(copy.deepcopy(m.language_model)))
    error = float((logits - ref_l).abs().max()) / rng
    print(f"dynamic int8, reduce_range={reduce_range}", (prefix_agreement(ref_t, t), error))
