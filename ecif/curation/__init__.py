"""The curator's side: decisions (SQLite), the review queue and its filters, exports."""

from ecif.curation.export import ExportResult, export_run
from ecif.curation.review import Filters, apply_filters, edit_spec, open_store, review_table
from ecif.curation.store import DecisionStore, Target

__all__ = ["DecisionStore", "ExportResult", "Filters", "Target", "apply_filters", "edit_spec",
           "export_run", "open_store", "review_table"]
