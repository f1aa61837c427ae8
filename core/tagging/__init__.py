"""Floor 4: tagging a catalog export: resumable runs, photo lookup, the output sheet.

``from core import tagging`` gives the whole public face; each name has one home:
:mod:`~core.tagging.run` (options, creating and running a run, its results),
:mod:`~core.tagging.photos` (finding the photos), :mod:`~core.tagging.tags` (combining and
counting tags), :mod:`~core.tagging.output` (the tagged sheet, the review queue) and
:mod:`~core.tagging.project` (runs kept in a project); :mod:`~core.tagging.distributed` tags on Ray Data.
"""

from core.tagging.output import (
    OUTPUT_COLUMNS,
    TAG_VALUES,
    Download,
    downloads,
    iter_rows_needing_review,
    overrides,
    review_photos,
    review_thumbnails,
    set_override,
    tag_names,
    write_output,
)
from core.tagging.photos import IMAGE_ROOTS_ENV, PhotoFinder, project_photo_files
from core.tagging.project import add_reviews_to_training, out_of_date, project_run_folder, start_project_run
from core.tagging.run import (
    Progress,
    TagOptions,
    TagSummary,
    catalog_rows,
    catalog_sheet,
    create_run,
    load_run,
    results_frame,
    resume_conflict,
    run_tagging,
)
from core.tagging.tags import (
    COMBINE_RULES,
    MOSTLY_UNLIKE,
    NOT_TAGGED,
    combine,
    combine_scored,
    final_labels,
    share_by,
    split_columns,
    tag_counts,
    unlike_rows,
)

__all__ = [
    "COMBINE_RULES", "Download", "IMAGE_ROOTS_ENV", "NOT_TAGGED", "OUTPUT_COLUMNS", "PhotoFinder", "Progress", "TagOptions",
    "TagSummary", "add_reviews_to_training", "catalog_rows", "catalog_sheet", "combine", "combine_scored",
    "create_run", "downloads", "final_labels", "iter_rows_needing_review", "load_run", "out_of_date", "overrides", "project_photo_files",
    "project_run_folder", "results_frame", "resume_conflict", "review_photos", "review_thumbnails", "run_tagging",
    "set_override", "share_by", "split_columns", "start_project_run", "tag_counts", "write_output",
    "TAG_VALUES", "tag_names", "MOSTLY_UNLIKE", "unlike_rows",
]
