// The one mapping from the core's statuses to gRPC's.
#ifndef TSCALE_SERVER_SERVICE_STATUS_H_
#define TSCALE_SERVER_SERVICE_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace tscale::service {

// Same code, same message. Internal and Unknown errors are also logged with `method`, since they
// mean a defect of the server rather than of the request.
grpc::Status ToGrpcStatus(const absl::Status& status, absl::string_view method);

}  // namespace tscale::service

#endif  // TSCALE_SERVER_SERVICE_STATUS_H_
