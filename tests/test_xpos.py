"""xPos against complex rotation with an exponential scale, computed per channel pair."""

import cmath

import pytest
import torch

from cope_pl.position import ModelDims, build_position_encoding


def test_logits_are_rope_times_zeta_to_the_distance_over_scale_base():
    d, n, scale_base, gamma = 8, 12, 5.0, 0.4
    enc = build_position_encoding("xpos", ModelDims(1, 1, d, 64), {"scale_base": scale_base}).double()
    q, k = torch.randn(1, 1, n, d, dtype=torch.float64), torch.randn(1, 1, n, d, dtype=torch.float64)
    rq, rk = enc.transform_qk(0, q, k)
    logits = (rq @ rk.transpose(-1, -2))[0, 0]
    for i in range(n):
        for j in range(n):
            expected = 0.0
            for c in range(d // 2):
                theta = 10000.0 ** (-2 * c / d)
                zeta = (c / (d / 2) + gamma) / (1 + gamma)
                qc = complex(q[0, 0, i, c], q[0, 0, i, c + d // 2])
                kc = complex(k[0, 0, j, c], k[0, 0, j, c + d // 2])
                expected += (qc * kc.conjugate() * cmath.exp(1j * (i - j) * theta)).real * zeta ** (
                    (i - j) / scale_base
                )
            assert logits[i, j].item() == pytest.approx(expected, abs=1e-5)  # float32 frequencies


def test_a_cached_step_transforms_as_the_full_sequence_does():
    enc = build_position_encoding("xpos", ModelDims(1, 2, 8, 64), {"scale_base": 4.0}).double()
    q, k = torch.randn(1, 2, 9, 4, dtype=torch.float64), torch.randn(1, 2, 9, 4, dtype=torch.float64)
    full_q, full_k = enc.transform_qk(0, q, k)
    step_q, step_k = enc.transform_qk(0, q[:, :, 6:], k[:, :, 6:], start=6)
    torch.testing.assert_close(step_q, full_q[:, :, 6:], rtol=0, atol=0)
    torch.testing.assert_close(step_k, full_k[:, :, 6:], rtol=0, atol=0)
