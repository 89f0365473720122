"""The documents bench/train.py trains on: real SmolLM2-135M-Instruct features of demo ShareGPT
conversations (core.assets, core.features), or random tensors of the same shapes, with the draft
vocab's maps and the target's head and final norm (the plain step's full-vocabulary logits); the
fresh draft both steps start from; the documents grouped into steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.model import DraftConfig, Eagle3Draft

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
               rms_norm_eps=1e-5, max_position_embeddings=8192)


def make_features(args) -> tuple[dict, str]:
    """{"docs": [...], "t2d", "d2t", "norm_weight", "lm_head"} and a description of the source."""
    if not args.random:
        try:
            return real_features(args), "real SmolLM2-135M-Instruct features (demo ShareGPT conversations)"
        except Exception as e:  # noqa: BLE001 - a bench falls back and says so
            print(f"[bench] real features unavailable ({type(e).__name__}: {e}); using random features")
    return random_features(args), "random features with SmolLM2 shapes"


def real_features(args) -> dict:
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from core.assets import demo_target
    from core.features import TargetFeatureExtractor
    from core.vocab import build_vocab, tokenize_dataset

    target = demo_target()
    tok = AutoTokenizer.from_pretrained(target)
    spec = SimpleNamespace(data="demo", split=None, messages_column=None, shuffle_seed=None,
                           limit=args.samples * 4, strict=False, max_length=args.seq)
    samples, _ = tokenize_dataset(spec, tok)
    vocab = build_vocab([(s[1], s[2]) for s in samples], args.draft_vocab, len(tok))
    samples = samples[:args.samples]
    ext = TargetFeatureExtractor(str(target), vocab, final_hidden=True, device="cpu")
    feats = ext([s[1] for s in samples])
    head = ext.lm_head.weight.detach().float().clone()
    norm_w = ext.norm.weight.detach().float().clone()
    docs = []
    for s, f in zip(samples, feats):
        docs.append({"input_ids": f.input_ids, "aux_hidden": f.aux_hidden.float(),
                     "target_probs": f.target_probs, "position_mask": f.position_mask,
                     "loss_mask": torch.tensor(s[2], dtype=torch.long), "final_hidden": f.final_hidden.float()})
    return {"docs": docs, "t2d": vocab.t2d, "d2t": vocab.d2t, "norm_weight": norm_w, "lm_head": head,
            "eps": ext.norm_eps}


def random_features(args) -> dict:
    g = torch.Generator().manual_seed(0)
    V, H, Vd = SMOLLM2["vocab_size"], SMOLLM2["hidden_size"], args.draft_vocab
    selected = torch.sort(torch.randperm(V, generator=g)[:Vd]).values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[selected] = True
    head = torch.randn(V, H, generator=g) * 0.05
    norm_w = torch.ones(H)
    docs = []
    for i in range(args.samples):
        n = int(torch.randint(args.seq // 4, args.seq + 1, (1,), generator=g))
        final = torch.randn(n, H, generator=g)
        full = F.rms_norm(final, (H,), norm_w, 1e-5) @ head.T
        lm = torch.zeros(n, dtype=torch.long)
        lm[n // 3:] = 1
        docs.append({"input_ids": torch.randint(0, V, (n,), generator=g),
                     "aux_hidden": torch.randn(n, 3 * H, generator=g), "loss_mask": lm,
                     "target_probs": torch.softmax(full[:, selected], -1),
                     "position_mask": t2d[full.argmax(-1)], "final_hidden": final})
    return {"docs": docs, "t2d": t2d, "d2t": selected - torch.arange(Vd), "norm_weight": norm_w,
            "lm_head": head, "eps": 1e-5}


def full_logits(feats: dict, doc: dict) -> torch.Tensor:
    h = doc["final_hidden"]
    return F.rms_norm(h, (h.shape[-1],), feats["norm_weight"], feats["eps"]) @ feats["lm_head"].T


def new_draft(feats: dict, draft_vocab: int) -> Eagle3Draft:
    hf = dict(SMOLLM2)
    cfg = DraftConfig.from_target_config(hf, draft_vocab)
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    draft.set_vocab((feats["d2t"], feats["t2d"]))
    with torch.no_grad():
        draft.embed_tokens.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return draft


def groups_of(docs: list, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, len(docs)))) for i in range(0, len(docs), size)]
