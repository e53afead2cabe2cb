"""One module per pipeline stage; each has `main(params)` and reads only its own params blocks."""
