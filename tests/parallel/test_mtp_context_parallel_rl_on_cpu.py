"""CP = 2 (2 gloo CPU ranks) gives the CP = 1 result for ``mtp_loss_type=rl``: log-probs, loss, lambda, gradients.

The real tiny ``GPTModel`` with K = 1 or 2 real MTP layers runs on the CPU platform's core attention (under CP:
all-gathered keys / values, zig-zag causal mask), so Megatron's own ``MultiTokenPredictionBlock`` rolls its
inputs across the CP ranks' chunks (``roll_tensor``'s boundary exchange). One actor micro-batch in verl's
no-padding layout (4 sequences of odd lengths, per-sequence temperatures, random advantages / old log-probs)
goes through what the engine runs for one micro-batch: verl's ``gptmodel_forward_model_engine`` (packing with
the CP zig-zag split and its alignment padding; THD or BSHD), the engine's logits processor (main and per-head
log-probs, head targets packed like verl's labels), verl's unpacking (CP all-gather), the engine's alignment
and the MTP policy loss with OCC (``MegatronMTPEngineWithLMHead.postprocess_micro_batch_func`` around verl's
``ppo_loss``, DAPO clip-higher). Each CP rank back-propagates its loss; gradients are then summed over the CP
group, as Megatron's gradient reduction over data-and-context parallel ranks does.

Asserted against the single-process CP = 1 run of the same weights, per layout (THD / BSHD) and K: aligned
log-probs of the main head (but its last slot per sequence, which scores whatever token verl's label roll puts
there: the next sequence's first token, or CP padding) and of every MTP head, their valid masks and top-1
agreement (1e-5), the loss and each head's OCC lambda (1e-5 relative), and every parameter's gradient (embedding,
decoder, MTP layers, output layer; 1e-5 relative + 1e-6 absolute). The lengths are not multiples of 2 * CP, so
the CP packing pads every sequence: a roll or mask that used the unpadded offsets (the Megatron-LM #4495 / #6205
bug class), or a chunk placed at the wrong global position, changes the numbers.
"""

from functools import partial

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from support.actor_config import DAPO, mtp_actor_config
from support.bare_engine import bare_engine
from support.mtp_parallel import (
    MODEL_KW,
    MODEL_SEED,
    RANK_SEED,
    apply_rl,
    full_params,
    grads,
    load_tp_shards,
)
from verl.models.mcore.model_forward import gptmodel_forward_model_engine
from verl.utils import tensordict_utils as tu
from verl.utils import torch_functional as verl_F
from verl.workers.utils.losses import ppo_loss

from verl_cpu.testing import (
    build_tiny_gpt,
    init_cpu_megatron,
    make_actor_batch,
    run_cpu_ranks,
)
from verl_mtp.models.mcore.mtp_alignment import mtp_output_keys
from verl_mtp.models.mcore.mtp_patch import MTPRLPostprocess
from verl_mtp.workers.config import MtpRLConfig, OCCConfig

pytestmark = pytest.mark.multiprocess

CP = 2
PROMPTS, RESPONSES = [3, 6, 2, 5], [4, 5, 7, 2]  # lengths 7, 11, 9, 7: none a multiple of 2 * CP
TEMPERATURES = [0.7, 1.0, 1.3, 0.9]
CONFIGS = [(fmt, k) for fmt in ("thd", "bshd") for k in (1, 2)]


def config_id(cfg) -> str:
    return f"{cfg[0]}-K{cfg[1]}"




def actor_batch():
    data = make_actor_batch(PROMPTS, RESPONSES, vocab_size=MODEL_KW["vocab_size"], seed=5)
    data["temperature"] = torch.tensor(TEMPERATURES)
    tu.assign_non_tensor(data, num_micro_batch=1)
    return data


def engine_micro_batch(model, hook: MTPRLPostprocess, fmt: str, num_heads: int):
    """Forward (verl's model-engine forward + the engine's logits processor), loss and backward of one
    micro-batch: ``(model_output, loss, metrics)``."""
    mtp_cfg = MtpRLConfig(enable=True, enable_train=True, mtp_loss_type="rl", occ=OCCConfig(enable=True))
    engine = bare_engine(hook, mtp_cfg, fmt)
    data = actor_batch()
    input_ids = data["input_ids"]
    processor = partial(
        engine._lm_head_logits_processor,
        calculate_sum_pi_squared=False,
        calculate_entropy=False,
        distillation_use_topk=False,
        distillation_only=False,
        logits_processor_func=None,
        batch=data,
        data_format=fmt,
    )
    loss_mask = data["loss_mask"].to(bool)
    args = {
        "label": input_ids.clone(),
        "temperature": verl_F.expand_as_nested(data["temperature"].float(), input_ids),
        "loss_mask": loss_mask,
        "response_attention_mask": data["attention_mask"][:, -loss_mask.shape[-1] :],
    }
    output = gptmodel_forward_model_engine(
        model, input_ids, {}, logits_processor=processor, logits_processor_args=args, pad_token_id=0,
        data_format=fmt, mtp_enable_train=True,
    )
    model_output = {}  # what the loss saw: the engine drops the heads' outputs once the loss has used them
    loss_fn = partial(_ppo_loss_keeping_outputs, config=mtp_actor_config(DAPO), sink=model_output)
    scaled_loss, out = engine.postprocess_micro_batch_func(output, data, forward_only=False, loss_function=loss_fn)
    scaled_loss.backward()
    lambdas = {k: float(out["metrics"][f"actor/mtp_{k}/lambda"]) for k in range(1, num_heads + 1)}
    return model_output, float(scaled_loss.detach()), lambdas


def _ppo_loss_keeping_outputs(config, model_output, data, dp_group=None, *, sink: dict):
    sink.update({k: [t.detach().clone() for t in v.unbind()] for k, v in model_output.items()})
    return ppo_loss(config, model_output, data, dp_group)


def _setup_model(num_heads: int, seed: int, fmt: str, params=None):
    model = build_tiny_gpt(num_heads, seed=seed, packed_attention=True, **MODEL_KW)
    if params is not None:
        load_tp_shards(model, params)
    hook = apply_rl(model, chunk=5, train_lm_head=True)
    model.zero_grad(set_to_none=True)
    return model, hook


def run_config(fmt: str, num_heads: int, params=None, seed: int = MODEL_SEED) -> dict:
    model, hook = _setup_model(num_heads, seed, fmt, params)
    model_output, loss, lambdas = engine_micro_batch(model, hook, fmt, num_heads)
    return {
        "params": full_params(model), "outputs": model_output, "loss": loss, "lambda": lambdas, "grads": grads(model)
    }


def _cp_rank(info, reference_params):
    init_cpu_megatron(cp=CP, rank=info.rank, world_size=info.world_size, init_method=info.init_method)
    group = parallel_state.get_context_parallel_group()
    results = {"cp_rank": parallel_state.get_context_parallel_rank()}
    for fmt, num_heads in CONFIGS:
        run = run_config(fmt, num_heads, reference_params[num_heads], seed=RANK_SEED)
        for g in run["grads"].values():
            if g is not None:
                dist.all_reduce(g, group=group)
        del run["params"]
        results[(fmt, num_heads)] = run
    return results


@pytest.fixture(scope="module")
def runs(cpu_megatron):
    refs = {cfg: run_config(*cfg) for cfg in CONFIGS}
    params = {k: refs[("thd", k)]["params"] for k in (1, 2)}
    ranks = run_cpu_ranks(_cp_rank, CP, params, timeout_s=900)
    assert sorted(r["cp_rank"] for r in ranks) == [0, 1]
    return refs, ranks


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_cp2_aligned_log_probs_equal_cp1(runs, cfg):
    refs, ranks = runs
    want = refs[cfg]["outputs"]
    keys = ["log_probs"] + [key for k in range(1, cfg[1] + 1) for key in mtp_output_keys(k)]
    assert set(keys) <= set(want)
    for r in ranks:
        got = r[cfg]["outputs"]
        for key in keys:
            assert len(got[key]) == len(want[key]) == len(PROMPTS), key
            for i, (g, w) in enumerate(zip(got[key], want[key], strict=True)):
                assert g.shape == w.shape == (PROMPTS[i] + RESPONSES[i],), (key, i)
                if key == "log_probs":  # verl's rolled label at a sequence's last slot is whatever follows it
                    g, w = g[:-1], w[:-1]
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, key=key, i=i: f"{key}[{i}]: {m}")
    valid = want[mtp_output_keys(cfg[1])[1]]
    assert all(v[: cfg[1]].logical_not().all() and v[cfg[1] :].all() for v in valid)


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_cp2_mtp_policy_loss_and_occ_lambda_equal_cp1(runs, cfg):
    refs, ranks = runs
    want = refs[cfg]
    for k in range(1, cfg[1] + 1):
        assert want["lambda"][k] != 0.0
    for r in ranks:  # every CP rank computes the loss on the gathered (whole) sequences
        assert r[cfg]["loss"] == pytest.approx(want["loss"], rel=1e-5)
        for k in range(1, cfg[1] + 1):
            assert r[cfg]["lambda"][k] == pytest.approx(want["lambda"][k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_cp2_gradients_summed_over_cp_equal_cp1(runs, cfg):
    refs, ranks = runs
    want = refs[cfg]["grads"]
    groups = ("embedding.", "decoder.", "mtp.", "output_layer.")
    assert all(any(n.startswith(g) for n in want) for g in groups)
    for r in ranks:
        got = r[cfg]["grads"]
        assert got.keys() == want.keys()
        for name, w in want.items():
            assert w is not None and got[name] is not None, name
            torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
