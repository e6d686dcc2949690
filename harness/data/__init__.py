"""What prepares data: sources and downloads, the tokenizer, token files and the training loader."""
