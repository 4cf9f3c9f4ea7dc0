"""``hstu.serving``: M-FALCON ranking, incremental user state, chunked retrieval and the standalone artifact loader
(docs/serving.md). Importing it needs torch only; ``hstu.serving.export`` (the exporter) needs the trainer."""

from hstu.serving.artifact import ArtifactError, ServingModel, load
from hstu.serving.mfalcon import MFalcon, UserState
from hstu.serving.ranking import RankingHistory, RankingMFalcon, RankScores
from hstu.serving.ranking_artifact import RankingServingModel
from hstu.serving.retrieval import ItemTable, TopK, topk_inner_product

__all__ = ["ArtifactError", "ServingModel", "load", "MFalcon", "UserState", "ItemTable", "TopK",
           "topk_inner_product", "RankingHistory", "RankingMFalcon", "RankScores", "RankingServingModel"]
