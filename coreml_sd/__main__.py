from coreml_sd.cli import main

main()
