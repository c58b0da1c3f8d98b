"""The torch.fx pass: find ReLU / max-pool sites (``sites``), rewrite them (``rewrite``), report it (``report``)."""

from .report import Report, Site, Unhandled
from .rewrite import excite, excite_graph, is_excited, report

__all__ = ["excite", "excite_graph", "report", "is_excited", "Report", "Site", "Unhandled"]
