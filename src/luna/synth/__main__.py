from luna.synth.cli import main

raise SystemExit(main())
