"""The study report: a generic factorial core (`core`) and optional sections that apply to some studies
(`augmentation`: what augmentation buys), over what every section reads (`common`)."""

from distcnn.study.report.common import Study, configuration_label, load_study, number
from distcnn.study.report.augmentation import data_needed, thresholds
from distcnn.study.report.core import command_report, report_blocks, write_report

__all__ = ["Study", "command_report", "configuration_label", "data_needed", "load_study", "number", "report_blocks",
           "thresholds", "write_report"]
