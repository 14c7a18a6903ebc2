"""Datasets as they are distributed, converted into the layout the training reads:
OUT/train/<class>/<image> and OUT/test/<class>/<image> (and OUT/val/ where asked), with the
sources' bounding boxes in OUT/boxes.csv. The command line is cmal.tools.prepare_data (also
`cmal-prepare-data`); these modules hold the conversion, one source module planning a list of
Items and the writer writing them.

Which module holds what:
  records   Item (one image to write: source -> split/class/name, with its box), Blob (an image
            held in memory), PrepareError (what a source or destination lacks), some().
  boxes     the boxes.csv format and its coordinate conventions: Box, BoxesError, write_boxes,
            read_boxes, box_from_corners, box_from_size, clip_box. Standard library only, so
            that the training can read boxes without pulling in the converters' dependencies.
  sources   what the source modules share: image files, folders per class, annotation tables,
            class names as folder names, the messages for unrecognised layouts and missing files.
  cars      Stanford Cars: devkit, Kaggle's nested copy, torchvision's root, car_ims/ with
            cars_annos.mat, class folders (plan_cars; scipy reads the .mat files).
  aircraft  FGVC-Aircraft 2013b (plan_aircraft).
  food11    Food-11, flat or in class folders (plan_food11).
  cub       CUB-200-2011 (plan_cub).
  parquet   HuggingFace parquet exports of any of them (find_parquet_files, plan_parquet; pyarrow
            is imported when one is read).
  writer    the checks before writing and the one writer: hard links, symbolic links or copies,
            the FGVC-Aircraft banner cut, the thread pool, OUT built under a temporary name and
            renamed (check_destination, check_items, without_bad_boxes, build).

This package imports none of them, and none imports cmal.tools.
"""
