"""The exact-gradient OCC estimator against ``torch.autograd.grad`` on a real tiny GPTModel with 2 MTP heads.

One actor micro-batch goes through what the engine runs for each of the estimator's passes (verl's model-engine
forward, the engine's logits processor, ``MegatronMTPEngineWithLMHead.postprocess_micro_batch_func`` in the
pass's loss mode: the RL loss alone, then head k's unit-coefficient MTP loss alone), back-propagated; the
estimator reads the gradients of the parameters it selects and forms ``c_k``, ``v_k^2``, ``lambda_k``.

Independently: the full loss with the MTP coefficients set to one-hot vectors (head k at 1, the other heads at
0) minus verl's RL loss alone gives head k's MTP loss; ``torch.autograd.grad`` of each loss w.r.t. the
parameters chosen by name (embedding and decoder, the output layer only with ``train_lm_head``), and the inner
products summed by hand.
"""

from functools import partial

import pytest
import torch
from support.actor_config import DAPO, mtp_actor_config
from support.bare_engine import bare_engine
from support.mtp_parallel import MODEL_KW, apply_rl
from verl.models.mcore.model_forward import gptmodel_forward_model_engine
from verl.utils import tensordict_utils as tu
from verl.utils import torch_functional as verl_F
from verl.utils.metric import Metric
from verl.workers.utils.losses import ppo_loss

from verl_cpu.testing import build_tiny_gpt, make_actor_batch
from verl_mtp.trainer.ppo.mtp_occ_gradient import (
    GradientOCC,
    GradientSnapshot,
    gradient_occ,
    gradient_occ_metrics,
    head_products,
    shared_trunk_parameters,
)
from verl_mtp.workers.config import MtpRLConfig, OCCConfig

K = 2
PROMPTS, RESPONSES = [3, 6, 2, 5], [4, 5, 7, 2]




def actor_batch():
    data = make_actor_batch(PROMPTS, RESPONSES, vocab_size=MODEL_KW["vocab_size"], seed=5)
    data["temperature"] = torch.tensor([0.7, 1.0, 1.3, 0.9])
    # old log-probs near the model's own, so that the clip keeps most tokens in the gradient
    data["old_log_probs"] = data["old_log_probs"] * 0.0 - 3.9
    tu.assign_non_tensor(data, num_micro_batch=1)
    return data


class MicroBatch:
    """The engine's forward + loss of one micro-batch, in whatever loss mode the engine is set to."""

    def __init__(self, train_lm_head: bool, seed: int = 7):
        self.model = build_tiny_gpt(K, seed=seed, packed_attention=True, **MODEL_KW)
        hook = apply_rl(self.model, chunk=5, train_lm_head=train_lm_head)
        mtp = MtpRLConfig(
            enable=True, enable_train=True, mtp_loss_type="rl", train_lm_head=train_lm_head, occ=OCCConfig(enable=True),
        )
        engine = bare_engine(hook, mtp)
        self.engine, self.base_loss = engine, partial(ppo_loss, config=mtp_actor_config(DAPO))

    def loss(self, mode=None, coefficients=None):
        """``(loss, metrics)`` of the micro-batch with the engine in loss mode ``mode``."""
        self.engine.mtp_state.loss_mode, self.engine.mtp_state.coefficients = mode, coefficients
        data = actor_batch()
        processor = partial(
            self.engine._lm_head_logits_processor, calculate_sum_pi_squared=False, calculate_entropy=False,
            distillation_use_topk=False, distillation_only=False, logits_processor_func=None, batch=data,
            data_format="thd",
        )
        loss_mask = data["loss_mask"].to(bool)
        args = {
            "label": data["input_ids"].clone(),
            "temperature": verl_F.expand_as_nested(data["temperature"].float(), data["input_ids"]),
            "loss_mask": loss_mask,
            "response_attention_mask": data["attention_mask"][:, -loss_mask.shape[-1] :],
        }
        output = gptmodel_forward_model_engine(
            self.model, data["input_ids"], {}, logits_processor=processor, logits_processor_args=args,
            pad_token_id=0, data_format="thd", mtp_enable_train=True,
        )
        loss, out = self.engine.postprocess_micro_batch_func(
            output, data, forward_only=False, loss_function=self.base_loss
        )
        return loss, out["metrics"]


def estimator_run(mb: MicroBatch, train_lm_head: bool) -> GradientOCC:
    """What ``mtp_engine_hooks._gradient_occ`` does, one micro-batch per pass."""
    params = shared_trunk_parameters([mb.model], train_lm_head)
    mb.model.zero_grad(set_to_none=True)
    mb.loss("rl")[0].backward()
    rl = GradientSnapshot.take(params)
    per_head = []
    for k in range(1, K + 1):
        mb.model.zero_grad(set_to_none=True)
        mb.loss(k)[0].backward()
        per_head.append(head_products(rl, params))
    mb.model.zero_grad(set_to_none=True)
    return gradient_occ(per_head)


def naive_statistics(mb: MicroBatch, train_lm_head: bool) -> dict:
    """c, v^2, ||g_RL||^2 per head by autograd.grad, with the parameters picked by name."""
    prefixes = ("embedding.", "decoder.") + (("output_layer.",) if train_lm_head else ())
    named = [(n, p) for n, p in mb.model.named_parameters() if n.startswith(prefixes)]
    params = [p for _, p in named]

    def grads_of(loss):
        return [torch.zeros_like(p) if g is None else g for g, p in
                zip(torch.autograd.grad(loss, params, allow_unused=True), params)]

    g_rl = grads_of(mb.loss("rl")[0])
    out = {"c": [], "v2": [], "rl_sq": sum(float((g.double() ** 2).sum()) for g in g_rl), "names": named}
    for k in range(1, K + 1):
        one_hot = torch.zeros(K, dtype=torch.float64)
        one_hot[k - 1] = 1.0
        full, _ = mb.loss(None, coefficients=one_hot)
        g_mtp = grads_of(full - mb.loss("rl")[0])
        out["c"].append(sum(float((a.double() * b.double()).sum()) for a, b in zip(g_rl, g_mtp)))
        out["v2"].append(sum(float((b.double() ** 2).sum()) for b in g_mtp))
    return out


@pytest.mark.parametrize("train_lm_head", [False, True], ids=["trunk", "trunk+lm_head"])
@pytest.mark.usefixtures("cpu_megatron")
def test_estimator_equals_autograd_inner_products(train_lm_head):
    mb = MicroBatch(train_lm_head)
    got = estimator_run(mb, train_lm_head)
    want = naive_statistics(mb, train_lm_head)
    assert any(n.startswith("output_layer.") for n, _ in want["names"]) == train_lm_head
    assert all(v > 0 for v in want["v2"]) and all(c != 0 for c in want["c"])
    torch.testing.assert_close(got.c, torch.tensor(want["c"], dtype=torch.float64), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got.v2, torch.tensor(want["v2"], dtype=torch.float64), rtol=1e-5, atol=1e-12)
    assert float(got.rl_sq) == pytest.approx(want["rl_sq"], rel=1e-5)
    lam, nonfinite = got.lambdas(0.5, 1e-8)
    for k in range(K):
        assert float(lam[k]) == pytest.approx(0.5 * want["c"][k] / (want["v2"][k] + 1e-8), rel=1e-5)
        cos = want["c"][k] / (want["rl_sq"] * want["v2"][k]) ** 0.5
        assert float(got.cosine()[k]) == pytest.approx(cos, rel=1e-5)
    assert not nonfinite.any()


@pytest.mark.usefixtures("cpu_megatron")
def test_estimator_selects_trunk_parameters_once():
    model = build_tiny_gpt(K, seed=7, **MODEL_KW)
    names = {id(p): n for n, p in model.named_parameters()}
    picked = [names[id(p)] for p in shared_trunk_parameters([model], train_lm_head=False)]
    assert picked and all(n.startswith(("embedding.", "decoder.")) for n in picked)
    assert len(picked) == len(set(picked)) == sum(n.startswith(("embedding.", "decoder.")) for n in names.values())


def test_nonfinite_statistics_give_lambda_zero_and_are_flagged():
    stats = GradientOCC(
        c=torch.tensor([float("nan"), 2.0, 1.0], dtype=torch.float64),
        v2=torch.tensor([1.0, float("inf"), 4.0], dtype=torch.float64),
        rl_sq=torch.tensor(1.0, dtype=torch.float64),
    )
    lam, nonfinite = stats.lambdas(1.0, 1e-8, max_abs=0.2)
    assert nonfinite.tolist() == [True, True, False]
    assert lam.tolist() == [0.0, 0.0, pytest.approx(0.2)]  # 0.25 clamped to max_abs_lambda
    assert torch.isfinite(stats.cosine()).all()
    metrics = gradient_occ_metrics(stats, lam, nonfinite)
    assert isinstance(metrics["actor/mtp_1/occ_grad_nonfinite"], Metric)
    assert metrics["actor/mtp_1/occ_grad_nonfinite"].values == [1.0]
    assert metrics["actor/mtp_3/occ_grad_lambda"].values == [pytest.approx(0.2)]
    assert {k.split("/")[-1] for k in metrics} == {
        "occ_grad_c", "occ_grad_v2", "occ_grad_cos", "occ_grad_lambda", "occ_grad_nonfinite"
    }


@pytest.mark.usefixtures("cpu_megatron")
def test_given_coefficients_replace_the_proxy_and_the_proxy_is_logged_next_to_them():
    mb = MicroBatch(train_lm_head=False)
    _, proxy_metrics = mb.loss(None)
    assert not any("occ_grad" in k for k in proxy_metrics)
    given = torch.tensor([0.25, -0.5], dtype=torch.float64)
    mb.engine.mtp_state.diagnosed = True
    _, metrics = mb.loss(None, coefficients=given)
    for k in (1, 2):
        assert metrics[f"actor/mtp_{k}/coef_applied"] == pytest.approx(float(given[k - 1]))
        assert metrics[f"actor/mtp_{k}/lambda"] == pytest.approx(float(given[k - 1]))  # dRL carries signal here
        proxy = proxy_metrics[f"actor/mtp_{k}/coef_applied"]
        assert metrics[f"actor/mtp_{k}/occ_grad_proxy_lambda"] == pytest.approx(proxy)
