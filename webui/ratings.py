"""Arena ratings from stored battles: online Elo, Bradley-Terry (maximum likelihood) with bootstrap
confidence intervals, and the pairwise win-rate matrix. Pure functions over (model_a, model_b, winner).

Ties (including "both bad") count as half a win for each side, as in LMSYS's leaderboard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Battle = tuple[str, str, str]  # (model_a, model_b, winner in model_a | model_b | tie | tie (bothbad))
SCALE, BASE, INIT = 400.0, 10.0, 1000.0


def score_a(winner: str) -> float:
    return {"model_a": 1.0, "model_b": 0.0}.get(winner, 0.5)


def online_elo(battles: Sequence[Battle], k: float = 4.0) -> dict[str, float]:
    """Sequential Elo in battle order (k=4 as LMSYS uses, so one vote moves a rating a little)."""
    rating: dict[str, float] = {}
    for a, b, winner in battles:
        ra, rb = rating.setdefault(a, INIT), rating.setdefault(b, INIT)
        ea = 1.0 / (1.0 + BASE ** ((rb - ra) / SCALE))
        sa = score_a(winner)
        rating[a] = ra + k * (sa - ea)
        rating[b] = rb + k * ((1.0 - sa) - (1.0 - ea))
    return rating


def _models(battles: Sequence[Battle]) -> list[str]:
    return sorted({m for a, b, _ in battles for m in (a, b)})


def bradley_terry(battles: Sequence[Battle], models: list[str] | None = None, iters: int = 200,
                  l2: float = 1e-6) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings on the Elo scale (mean 1000), by Newton's method.

    A tiny L2 term keeps ratings finite when a model won (or lost) every battle.
    """
    models = models or _models(battles)
    if not battles or len(models) < 2:
        return {m: INIT for m in models}
    idx = {m: i for i, m in enumerate(models)}
    ia = np.array([idx[a] for a, _, _ in battles])
    ib = np.array([idx[b] for _, b, _ in battles])
    y = np.array([score_a(w) for _, _, w in battles])
    n = len(models)
    theta = np.zeros(n)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(theta[ia] - theta[ib])))
        r = y - p
        grad = np.bincount(ia, r, n) - np.bincount(ib, r, n) - l2 * theta
        w = p * (1 - p)
        hess = np.zeros((n, n))
        np.add.at(hess, (ia, ia), w)
        np.add.at(hess, (ib, ib), w)
        np.add.at(hess, (ia, ib), -w)
        np.add.at(hess, (ib, ia), -w)
        hess += (l2 + 1e-9) * np.eye(n)
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.max(np.abs(step)) < 1e-9:
            break
    theta -= theta.mean()
    elo = INIT + theta * SCALE / np.log(BASE)
    return {m: float(elo[i]) for m, i in idx.items()}


def bootstrap_ci(battles: Sequence[Battle], rounds: int = 100, seed: int = 0,
                 alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals of the Bradley-Terry ratings over battles resampled with replacement."""
    models = _models(battles)
    if not battles:
        return {}
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(models)))
    for r in range(rounds):
        pick = rng.integers(0, len(battles), len(battles))
        ratings = bradley_terry([battles[i] for i in pick], models)
        samples[r] = [ratings[m] for m in models]
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2], axis=0)
    return {m: (float(lo[i]), float(hi[i])) for i, m in enumerate(models)}


def win_matrix(battles: Sequence[Battle]) -> tuple[list[str], np.ndarray]:
    """models, M with M[i, j] = share of i's battles against j that i won (ties half); NaN where none."""
    models = _models(battles)
    idx = {m: i for i, m in enumerate(models)}
    wins = np.zeros((len(models), len(models)))
    games = np.zeros_like(wins)
    for a, b, w in battles:
        i, j, s = idx[a], idx[b], score_a(w)
        wins[i, j] += s
        wins[j, i] += 1 - s
        games[i, j] += 1
        games[j, i] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return models, np.where(games > 0, wins / np.maximum(games, 1), np.nan)


@dataclass(frozen=True)
class Row:
    rank: int
    model: str
    bt: float
    ci_low: float
    ci_high: float
    elo: float
    battles: int
    win_rate: float


def leaderboard(battles: Sequence[Battle], rounds: int = 100) -> list[Row]:
    elo, bt, ci = online_elo(battles), bradley_terry(battles), bootstrap_ci(battles, rounds)
    counts: dict[str, int] = {}
    won: dict[str, float] = {}
    for a, b, w in battles:
        s = score_a(w)
        for m, got in ((a, s), (b, 1 - s)):
            counts[m] = counts.get(m, 0) + 1
            won[m] = won.get(m, 0.0) + got
    order = sorted(bt, key=lambda m: -bt[m])
    return [Row(rank=i + 1, model=m, bt=bt[m], ci_low=ci[m][0], ci_high=ci[m][1], elo=elo[m], battles=counts[m],
                win_rate=won[m] / counts[m]) for i, m in enumerate(order)]
