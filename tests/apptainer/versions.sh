# shellcheck shell=bash
# What the Apptainer tests were written for: Debian sid's apptainer, and the Whisper image they build.
APPTAINER_VERSION=1.4.5  # `apptainer --version`; Debian sid packaged it as 1.4.5-2
WHISPER_PACKAGES=(faster-whisper==1.2.1 'werkzeug>=3' 'gunicorn>=22')
WHISPER_SIF=pilotfish-whisper_1.2.1.sif
