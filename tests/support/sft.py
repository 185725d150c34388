"""Offline SFT test material: a tokenizer with a chat template of Ling's shape, generated
conversations (learnable: the answers follow from the questions), and harness rank functions."""
from __future__ import annotations

import json
import os
import random

# Same shape as Ling 2.0's template: <role>X</role> headers, every turn ends in <|role_end|>, a
# "detailed thinking off" system line. Written here for the tests; the code only ever uses the
# template found in the user's tokenizer directory.
LING_SHAPED_TEMPLATE = (
    "{%- set ns = namespace(sys=false) -%}"
    "{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.sys = true -%}{%- endif -%}{%- endfor -%}"
    "{%- if not ns.sys -%}<role>SYSTEM</role>detailed thinking off<|role_end|>{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}<role>SYSTEM</role>{{ m.content }}\ndetailed thinking off<|role_end|>"
    "{%- elif m.role == 'user' -%}<role>HUMAN</role>{{ m.content }}<|role_end|>"
    "{%- elif m.role == 'assistant' -%}<role>ASSISTANT</role>{{ m.content or '' }}"
    "{%- for c in (m.tool_calls or []) -%}<tool_call>{{ c.function.name }}({{ c.function.arguments }})</tool_call>"
    "{%- endfor -%}<|role_end|>"
    "{%- elif m.role == 'tool' -%}<role>OBSERVATION</role>{{ m.content }}<|role_end|>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<role>ASSISTANT</role>{%- endif -%}"
)
SPECIALS = ["<|endoftext|>", "<role>", "</role>", "<|role_end|>", "<tool_call>", "</tool_call>"]
WORDS = ("apple river stone cloud green seven quick blue lamp north garden silver paper window "
         "tiger maple orange violet copper desert").split()


def conversation(rng: random.Random, max_turns: int = 3, tools: bool = True) -> dict:
    """A random conversation (optional system, 1..max_turns user/assistant rounds, tool turns)."""
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": "You are a " + rng.choice(WORDS) + " helper."})
    for _ in range(rng.randint(1, max_turns)):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        w = rng.sample(WORDS, rng.randint(1, 3))
        if tools and rng.random() < 0.25:
            msgs.append({"role": "user", "content": f"look up {w[0]}"})
            msgs.append({"role": "assistant", "content": "",
                         "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": w[0]}}]})
            msgs.append({"role": "tool", "content": f"{w[0]} is {len(w[0])} letters"})
            msgs.append({"role": "assistant", "content": f"{w[0]} has {len(w[0])} letters."})
        elif rng.random() < 0.5:
            msgs.append({"role": "user", "content": f"add {a} and {b}"})
            msgs.append({"role": "assistant", "content": f"{a} + {b} = {a + b}"})
        else:
            msgs.append({"role": "user", "content": "reverse: " + " ".join(w)})
            msgs.append({"role": "assistant", "content": " ".join(reversed(w))})
    return {"messages": msgs}


def write_conversations(path: str, n: int, seed: int, **kw) -> list[dict]:
    rng = random.Random(seed)
    convs = [conversation(rng, **kw) for _ in range(n)]
    with open(path, "w") as f:
        for c in convs:
            f.write(json.dumps(c) + "\n")
    return convs


def make_chat_tokenizer(directory: str, template: str | None = LING_SHAPED_TEMPLATE, vocab_size: int = 512) -> str:
    """A byte-level BPE trained offline on generated conversations, with Ling-style special tokens,
    <|role_end|> as eos, and ``template`` as chat_template in tokenizer_config.json."""
    from tokenizers import AddedToken

    from megatron_ling.data.tokenizer import LingTokenizer, train_builtin_tokenizer

    rng = random.Random(0)
    texts = [m["content"] for _ in range(400) for m in conversation(rng)["messages"] if m["content"]]
    backend = train_builtin_tokenizer(texts, vocab_size)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    eos = backend.token_to_id("<|role_end|>")
    pad = backend.token_to_id("<|endoftext|>")
    LingTokenizer(backend, eos, pad, "chat-test", "x", "tokenizers", "<|role_end|>", "<|endoftext|>").save(directory)
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    if template is not None:
        cfg["chat_template"] = template
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    return directory


def _collate(samples):
    import torch

    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def packing_rank(ctx, parallel: dict, prefix: str, seq_length: int, mbs: dict, normalization: str,
                 z_loss: float = 0.0, mtp: bool = True):
    """Same conversations packed and one per sequence, through megatron's schedule on one model:
    per-rank {objective, lm loss, per-conversation means (unpacked), main_grads} for each.
    ``z_loss``: the router z-loss coefficient (over the assistant tokens, training/sft.py);
    ``mtp=False``: ling-tiny without its MTP layer. Under VPP megatron's interleaved schedule
    needs the micro-batch count to be a multiple of PP on both sides, so the test uses the
    longest prefix of the conversations for which it is (``out["conversations"]``)."""
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ling.data.packing import ChatDataset
    from megatron_ling.models.config import get_preset
    from megatron_ling.models.options import ModelOptions
    from megatron_ling.parallel.config import ParallelConfig
    from megatron_ling.training.setup import build_model, build_optimizer, init_model_parallel
    from megatron_ling.training.sft import chat_forward_step
    from megatron_ling.training.step import run_forward_backward

    pc = ParallelConfig(**parallel).validate(ctx.world)
    ling = get_preset("ling-tiny", initializer_range=0.1, **({} if mtp else {"num_nextn_predict_layers": 0}))
    init_model_parallel(pc, ling, 1234)
    # the expert-bias update changes the model between the two runs: off here (see docs/sft.md)
    opts = ModelOptions(z_loss_coeff=z_loss, expert_bias_update_rate=0.0)
    bundle = build_model(ling, pc, opts, tf_overrides={"calculate_per_token_loss": True}, init_seed=7)
    build_optimizer(bundle, pc, opts, lr=1e-3)
    ids = numpy.arange(len(IndexedDataset(prefix)))
    if (pc.vpp or 1) > 1:
        def fits(k):
            return all(len(ChatDataset([prefix], ids[:k], seq_length, 0, packing=p)) % (pc.pp * mbs[str(p)]) == 0
                       for p in (True, False))
        ids = ids[:max(k for k in range(1, len(ids) + 1) if fits(k))]
    out = {"conversations": len(ids), "chunks": len(bundle.chunks)}
    for packing in (True, False):
        ds = ChatDataset([prefix], ids, seq_length, 0, packing=packing, loss_normalization=normalization)
        n = mbs[str(packing)]
        batches = [_collate([ds[j] for j in range(i, min(i + n, len(ds)))]) for i in range(0, len(ds) - n + 1, n)]
        assert sum(len(b["tokens"]) for b in batches) == len(ds), "test data must fill whole micro-batches"
        for c in bundle.chunks:
            c.zero_grad_buffer()
        res = run_forward_backward(bundle, batches, seq_length, n, step_fn=chat_forward_step)
        grads = {name: p.main_grad.detach().clone() for c in bundle.chunks for name, p in c.named_parameters()}
        rep = {k: [d[k].double() for d in res] for k in ("lm loss", "sft objective")} if res else {}
        out[packing] = {"reports": rep, "grads": grads, "samples": len(ds), "padding": ds.padding_fraction()}
    return out


def save_random_hf_model(directory: str, cfg, seed: int = 0) -> str:
    """A tiny random-weight HF BailingMoeV2 (NeMo-AutoModel's implementation) as config.json +
    model.safetensors, fp32."""
    import torch
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.models.ling_v2 import BailingMoeV2Config, BailingMoeV2ForCausalLM
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    d = cfg.to_hf_dict()
    d["torch_dtype"] = "float32"
    m = BailingMoeV2ForCausalLM(BailingMoeV2Config(**{k: v for k, v in d.items() if k not in ("architectures",
                                                                                             "model_type")}),
                                backend=BackendConfig(attn="sdpa", linear="torch", rms_norm="torch",
                                                      experts="torch", dispatcher="torch"))
    with torch.no_grad():  # nemo leaves some weights at zero/one; give every tensor random values
        for n, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 if p.dim() > 1 else 1.0 + 0.1 * torch.randn_like(p))
    sd = {k: v.contiguous() for k, v in m.state_dict_adapter.to_hf(m.state_dict()).items()}
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    cfg.save_hf_config(os.path.join(directory, "config.json"))
    return directory


def hf_assistant_loss(hf_dir: str, prefix: str) -> tuple[float, int]:
    """(assistant-token mean loss, tokens) of the HF model over every conversation of a chat
    prefix, one conversation per forward."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ling.convert.verify import reference_model

    model = reference_model(hf_dir)
    toks, masks = IndexedDataset(prefix), IndexedDataset(prefix + "_loss_mask")
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(toks)):
            ids = torch.as_tensor(toks[i].astype("int64"))[None]
            m = torch.as_tensor(masks[i].astype("float64"))[1:]
            logits = model(ids[:, :-1]).logits.double()[0]
            ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += float((ce * m).sum())
            n += int(m.sum())
    return total / n, n


def megatron_assistant_loss_rank(ctx, ckpt_dir: str, prefix: str, seq_length: int, pad: int):
    """The same loss from the trained megatron checkpoint through the SFT path (packed samples,
    per-conversation mask), TP1, fp32."""
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ling.convert.verify import load_megatron_model, single_process_megatron
    from megatron_ling.data.packing import ChatDataset
    from megatron_ling.training.sft import chat_forward_step

    with single_process_megatron():
        _, model = load_megatron_model(ckpt_dir)
        ds = ChatDataset([prefix], numpy.arange(len(IndexedDataset(prefix))), seq_length, pad, packing=True)
        t = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i in range(len(ds)):
                out, lf = chat_forward_step(iter([_collate([ds[i]])]), model)
                t += lf(out)[2]["lm loss"].double()
    return float(t[0] / t[1]), int(t[1]), len(ds)


def grad_rel_diff(a: dict, b: dict) -> float:
    """Worst relative difference (norm) over the named gradients of two runs."""
    return max(float((a[k] - g).norm() / g.norm().clamp(min=1e-30)) for k, g in b.items())
