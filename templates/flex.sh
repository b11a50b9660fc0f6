#!/usr/bin/env bash
# Build the dicom-etl image and its four Dataflow flex templates, or run one of them.
#
#   templates/flex.sh build
#   templates/flex.sh run import_dicom 'input=gs://landing/2026-11-23/**.dcm' 'store=gs://archive/store'
#
# Settings, from the environment:
#   PROJECT, REGION   the Google Cloud project and the Dataflow region
#   BUCKET            gs://bucket[/prefix] for the template specs (templates/), staging/ and tmp/
#   IMAGE             optional; default REGION-docker.pkg.dev/PROJECT/dicom-etl/dicom-etl:latest (the
#                     Artifact Registry repository must exist; `gcloud auth configure-docker` for push)
#   JOB_NAME          optional, for run; default the pipeline's name and the time
# `run` submits the job and returns: gcloud prints the job's id and state, nothing waits for the job.
set -euo pipefail
cd "$(dirname "$0")/.."

PIPELINES="import_dicom export_dicom export_metadata delete_dicom"
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET to gs://bucket}"
IMAGE=${IMAGE:-$REGION-docker.pkg.dev/$PROJECT/dicom-etl/dicom-etl:latest}
BUCKET=${BUCKET%/}

build() {
  docker build -f templates/Dockerfile -t "$IMAGE" .
  docker push "$IMAGE"
  for pipeline in $PIPELINES; do
    gcloud dataflow flex-template build "$BUCKET/templates/$pipeline.json" \
      --project="$PROJECT" \
      --image="$IMAGE" \
      --sdk-language=PYTHON \
      --metadata-file="templates/$pipeline/metadata.json"
  done
}

run() {
  local pipeline=${1:?usage: templates/flex.sh run PIPELINE name=value ...}
  shift
  case " $PIPELINES " in *" $pipeline "*) ;; *) echo "unknown pipeline: $pipeline" >&2; exit 2 ;; esac
  # gcloud splits --parameters at commas, which list values use (input=a,b): ^~^ makes ~ the delimiter.
  # sdk_container_image makes the workers boot from the launcher's own image.
  local parameters="^~^sdk_container_image=$IMAGE"
  for parameter in "$@"; do parameters+="~$parameter"; done
  gcloud dataflow flex-template run "${JOB_NAME:-${pipeline//_/-}-$(date -u +%Y%m%d-%H%M%S)}" \
    --project="$PROJECT" \
    --region="$REGION" \
    --template-file-gcs-location="$BUCKET/templates/$pipeline.json" \
    --staging-location="$BUCKET/staging" \
    --temp-location="$BUCKET/tmp" \
    --parameters="$parameters"
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: templates/flex.sh build | run PIPELINE name=value ..." >&2; exit 2 ;;
esac
