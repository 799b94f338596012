"""ElasticFace (Boutros et al. 2022; the authors' utils/losses.py::ElasticArcFace / ElasticCosFace with
`plus`, config/config.py: m = 0.5 arc / 0.35 cos, sigma = 0.05, plus: 0.0175 arc / 0.02 cos).

Per valid row (batch order) a margin ~ N(m, sigma) from a seeded CPU generator identical on every
rank (its state is the margin's extra state, checkpointed); arc: s*cos(theta + m_i) with NO fallback
past pi (the authors' acos/cos), cos: s*(c - m_i). Sorted (plus, head.elastic_sorted): the drawn
margins are sorted ascending and the row at batch position k gets sorted[order[k]], order = the
valid rows sorted by target cosine, descending (torch.sort on the global target cosines, detached),
exactly the authors' `margin[idicate_cosie]`. m_i = lambda_i * drawn margin.
"""
from __future__ import annotations

import torch

from largefr.config import HeadConfig
from largefr.heads.margins.base import Margin, MarginBatch, MarginStep, arc_psi


class ElasticFace(Margin, name="elasticface"):
    """A margin drawn per row from N(m, sigma) (sorted by target cosine in the 'plus' variant)."""

    def __init__(self, config: HeadConfig, *, seed: int = 0, device: torch.device | None = None):
        super().__init__(config, seed=seed, device=device)
        self.needs_target_facts = config.elastic_sorted
        self.generator = torch.Generator().manual_seed(seed)  # CPU: same state on every rank and device type

    @staticmethod
    def mean_std(config: HeadConfig) -> tuple[float, float]:
        """(m, sigma): head.elastic_margin / elastic_std, else the paper's for the form and variant."""
        mean = config.elastic_margin if config.elastic_margin is not None else (0.5 if config.elastic_form == "arc"
                                                                                else 0.35)
        if config.elastic_std is not None:
            return mean, config.elastic_std
        if not config.elastic_sorted:
            return mean, 0.05
        return mean, 0.0175 if config.elastic_form == "arc" else 0.02

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _remember(self) -> None:
        self._undo = {"generator": self.generator.get_state()}

    @torch.no_grad()
    def undo_last_update(self) -> None:
        if self._undo is not None:
            self.generator.set_state(self._undo["generator"])
            self._undo = None

    @torch.no_grad()
    def draw(self, labels: torch.Tensor, target_cos: torch.Tensor | None) -> torch.Tensor:
        """(B_g,) margin of every gathered row (0 where ignored): one N(m, sigma) draw per valid row."""
        self._remember()
        valid_rows = torch.nonzero(labels >= 0).squeeze(1)
        mean, std = self.mean_std(self.config)
        drawn = torch.randn(valid_rows.numel(), generator=self.generator, dtype=torch.float64) * std + mean
        drawn = drawn.to(labels.device)
        if self.config.elastic_sorted:
            order = torch.argsort(target_cos[valid_rows], descending=True)
            drawn = torch.sort(drawn).values[order]  # the authors' margin[idicate_cosie], literally
        return torch.zeros(labels.shape, dtype=torch.float64, device=labels.device).index_put_((valid_rows,), drawn)

    def step(self, batch: MarginBatch) -> MarginStep:
        margin = self.draw(batch.labels, batch.target_cos)[batch.rows].to(batch.features.dtype) * batch.lambdas()
        zeros = torch.zeros_like(margin)
        pair = (margin, zeros) if self.config.elastic_form == "arc" else (zeros, margin)
        return MarginStep(params=torch.stack(pair, dim=1))

    def stats(self) -> dict[str, float]:
        return {}

    def target_logit(self, cos, params):
        params = params.to(cos.dtype)
        if self.config.elastic_form == "arc":
            return self.scale * arc_psi(cos, params[:, 0], "none")
        return self.scale * (cos - params[:, 1])
