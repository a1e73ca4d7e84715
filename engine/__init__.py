"""parity's own diffusion engine. Importing it changes nothing global."""
