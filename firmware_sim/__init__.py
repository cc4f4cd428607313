"""The device simulator: a board in software with a fixed RAM budget."""
