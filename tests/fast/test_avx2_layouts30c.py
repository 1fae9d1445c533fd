"""Under bf16 autocast on a CPU without oneDNN's bf16 kernels (an AVX2 CPU), ATen's own convolution and GEMM round
by the layout of their operands, so transformers' bit parity needs transformers' layouts (see
test_slow_conv_layout30.py). Two places where ours still differed, run in a subprocess whose PyTorch and oneDNN
behave as on an AVX2 CPU (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``):

- channels-last pixel values: transformers' first patch embedding convolves them as given; ours made them
  contiguous (logits one bf16 step away at batch 2);
- the Mix-FFN with hidden dropout in training at batch 1: transformers' dense2 reads the depthwise convolution's
  transposed (B, N, C) view; ours made it contiguous first (every stage's output differed)."""

from __future__ import annotations

import textwrap

from test_slow_conv_layout30 import run_as_on_avx2


def test_on_an_avx2_cpu_bf16_autocast_equals_transformers_bit_for_bit_channels_last_and_batch1_dropout():
    script = textwrap.dedent("""
        import sys, torch, transformers
        sys.path.insert(0, sys.argv[1])
        from conftest import TINY, hf_config, random_weights_
        from pvtv2 import PvtV2Config, PvtV2ForImageClassification, fast
        assert not torch.ops.mkldnn._is_mkldnn_bf16_supported()
        cases = [  # (batch, channels-last input, hidden dropout, training)
            (2, True, 0.0, False), (1, True, 0.0, False), (1, False, 0.1, True), (1, True, 0.1, True),
        ]
        for batch, channels_last, dropout, training in cases:
            config = PvtV2Config(**TINY, num_labels=5, hidden_dropout_prob=dropout)
            ours = random_weights_(PvtV2ForImageClassification(config), seed=1).train(training)
            theirs = transformers.PvtV2ForImageClassification(hf_config(config)).train(training)
            theirs.load_state_dict(ours.state_dict())
            x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            outs = []
            for model in (ours, theirs):
                torch.manual_seed(7)
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), fast.fast_path(False):
                    outs.append(model(x, output_hidden_states=True))
            got, want = outs
            case = (batch, channels_last, dropout, training)
            assert got.logits.dtype == torch.bfloat16, case
            assert torch.equal(got.logits, want.logits), (case, (got.logits - want.logits).abs().max())
            for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
                assert torch.equal(a, b), case
        print("bit-equal")
    """)
    run_as_on_avx2(script)
