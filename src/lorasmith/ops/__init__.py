"""The library: one public function per operation, each returning a pydantic result and never printing."""
