"""`python -m internvl_chat.hub.convert`: the `internvl-chat convert` command line."""

from .cli import main

raise SystemExit(main())
