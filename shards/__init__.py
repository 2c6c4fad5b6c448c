"""Dataset -> WebDataset shard writers (thin command-line fronts over ``carl_scale.data``)."""
