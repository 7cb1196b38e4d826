"""Records: read from files or generated, checked, and encoded for training. Knows no benchmark or scorer."""
