import sys

try:
    from coreml_sd.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command's modules load: nothing has been written yet
    print("Stopped: interrupted (Ctrl-C) before the command started; nothing was written", file=sys.stderr)
    sys.exit(130)

main()
