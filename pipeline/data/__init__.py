"""Records to tokens: read a data file (`read`), prepare the examples (`prepare`), collate batches (`collate`), check the files a config names (`inputs`)."""
