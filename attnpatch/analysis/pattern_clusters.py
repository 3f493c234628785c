"""Pattern summary: a small autoencoder embeds every sampled attention map, k-means clusters the embeddings, and
each cluster gets a representative map; each head gets its histogram over clusters (Li et al., TVCG 2023: an
autoencoder summary of the patterns heads learn). Needs scikit-learn (`pip install 'attnpatch[viz]'`).

Maps are scaled to a maximum of 1 before encoding, so clusters group shapes (where the attention goes), not
sharpness alone. Cells of a re-centred map where no key exists (beyond the grid edge, before the start of a text)
are filled with the map's mean over the cells that exist, so that a broad map looks the same wherever its query sits
instead of being shaped by the edge. The raw maps stay available for display.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .patterns import PatternSet


class PatternAutoencoder(nn.Module):
    """MLP autoencoder for flattened maps in [0, 1]: features -> hidden -> latent -> hidden -> features (sigmoid)."""

    def __init__(self, features: int, latent: int = 8, hidden: int = 128):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)


def train_autoencoder(
    x: torch.Tensor, *, latent: int = 8, steps: int = 1500, batch_size: int = 256, lr: float = 3e-3, seed: int = 0
) -> tuple[PatternAutoencoder, list[float]]:
    """Fit a PatternAutoencoder to rows of `x` [N, F] by MSE with Adam; returns it (eval mode) and the loss per
    100 steps."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PatternAutoencoder(x.shape[1], latent)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    history, running = [], 0.0
    for step in range(steps):
        batch = x[torch.randint(len(x), (min(batch_size, len(x)),), generator=generator)]
        loss = nn.functional.mse_loss(model(batch)[1], batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            history.append(running / ((step % 100) + 1))
            running = 0.0
    return model.eval(), history


@dataclass
class PatternSummary:
    """Clusters of a PatternSet. labels [N] cluster of each map; latents [N, latent]; embedding [N, 2] (PCA of the
    latents, for plots); representatives [k, h, w] the mean scaled map of each cluster; exemplars [k] index of the
    map nearest each centroid; histogram [L, H, k] fraction of each head's maps in each cluster (layers as in
    `layers`); loss: autoencoder reconstruction MSE on all maps."""

    patterns: PatternSet
    layers: list[int]
    labels: torch.Tensor
    latents: torch.Tensor
    embedding: torch.Tensor
    representatives: torch.Tensor
    exemplars: torch.Tensor
    histogram: torch.Tensor
    loss: float
    loss_history: list[float]

    @property
    def clusters(self) -> int:
        return int(self.representatives.shape[0])

    def sizes(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.clusters).tolist()

    def dominant(self) -> torch.Tensor:
        """[L, H] the cluster holding most of each head's maps."""
        return self.histogram.argmax(-1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "clusters": self.clusters,
            "maps": len(self.labels),
            "sizes": self.sizes(),
            "reconstruction_mse": self.loss,
            "layers": self.layers,
            "dominant_cluster": self.dominant().tolist(),
            "histogram": self.histogram.tolist(),
        }


def _sklearn() -> Any:
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ImportError("pattern summaries need scikit-learn: pip install 'attnpatch[viz]'") from exc
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    return KMeans, PCA


def fill_outside(maps: torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:
    """`maps` with the cells outside `support` set to the map's mean over its support."""
    if support is None:
        return maps
    flat, inside = maps.flatten(1), support.flatten(1)
    mean = (flat * inside).sum(-1) / inside.sum(-1).clamp_min(1)
    return torch.where(inside, flat, mean[:, None]).reshape(maps.shape)


def summarize_patterns(
    patterns: PatternSet,
    *,
    clusters: int = 8,
    latent: int = 8,
    steps: int = 1500,
    fill: bool = True,
    seed: int = 0,
) -> PatternSummary:
    """Train the autoencoder on the max-scaled maps (with `fill`, cells where no key exists hold the map's mean),
    k-means (`clusters`) on its latents, and summarise."""
    KMeans, PCA = _sklearn()
    maps = fill_outside(patterns.maps, patterns.support) if fill else patterns.maps
    peak = maps.flatten(1).amax(-1)
    if bool((peak <= 0).any()):
        raise ValueError("some maps hold no attention (all keys excluded); drop them before summarising")
    if len(maps) < clusters:
        raise ValueError(f"{len(maps)} maps cannot form {clusters} clusters")
    x = (maps.flatten(1) / peak[:, None]).float()
    with torch.enable_grad():
        model, history = train_autoencoder(x, latent=latent, steps=steps, seed=seed)
    with torch.no_grad():
        latents, recon = model(x)
        loss = float(nn.functional.mse_loss(recon, x))
    km = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(latents.numpy())
    labels = torch.as_tensor(km.labels_, dtype=torch.long)
    embedding = torch.as_tensor(PCA(n_components=2, random_state=seed).fit_transform(latents.numpy())).float()
    centres = torch.as_tensor(km.cluster_centers_).float()
    exemplars = torch.cdist(centres, latents).argmin(-1)
    representatives = torch.stack([x[labels == c].mean(0) for c in range(clusters)]).reshape(clusters, *maps.shape[1:])
    layers = sorted(patterns.num_heads)
    width = max(patterns.num_heads.values())
    histogram = torch.zeros(len(layers), width, clusters)
    row = {layer: i for i, layer in enumerate(layers)}
    for layer, head, label in zip(patterns.layer.tolist(), patterns.head.tolist(), labels.tolist(), strict=True):
        histogram[row[layer], head, label] += 1
    histogram /= histogram.sum(-1, keepdim=True).clamp_min(1)
    return PatternSummary(
        patterns=patterns, layers=layers, labels=labels, latents=latents, embedding=embedding,
        representatives=representatives, exemplars=exemplars, histogram=histogram, loss=loss, loss_history=history,
    )  # fmt: skip
