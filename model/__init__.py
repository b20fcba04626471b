"""PonderV2 networks (checkpoint-compatible with the official implementation), heads and input pipeline."""

import warnings

# spconv 2.3.6 decorates its autograd functions with torch.cuda.amp.custom_fwd, deprecated in torch 2.4+.
warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.custom_(fwd|bwd).*", category=FutureWarning)
