"""One module per operation: the public function, its ``torch.library`` custom ops (fake and
autograd registrations) and the calls into the Rust core."""
