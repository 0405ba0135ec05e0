from distcnn.cli import main

raise SystemExit(main())
