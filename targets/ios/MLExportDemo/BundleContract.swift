import Foundation

/// bundle.json, written by `mlexport bundle ios`: the model's files with sizes and hashes, stop tokens, context
/// length and the chat prompt template. The app reads nothing else about the model.
struct BundleContract: Decodable {
    static let supportedContract = 1

    struct Runtime: Decodable { let name: String; let version: String? }
    struct File: Decodable { let path: String; let bytes: Int; let sha256: String }

    let contractVersion: Int
    let target: String
    let quant: String?
    let modelFile: String
    let tokenizerFile: String
    let runtime: Runtime
    let maxContext: Int
    let eosIds: [Int]
    let promptTemplate: String
    let files: [File]

    enum CodingKeys: String, CodingKey {
        case contractVersion = "contract_version", target, quant, modelFile = "model_file"
        case tokenizerFile = "tokenizer_file", runtime, maxContext = "max_context", eosIds = "eos_ids"
        case promptTemplate = "prompt_template", files
    }

    static func load() throws -> BundleContract {
        guard let url = Bundle.main.url(forResource: "bundle", withExtension: "json") else {
            throw DemoError("bundle.json is not in the app: run mlexport bundle ios --app targets/ios")
        }
        let contract = try JSONDecoder().decode(BundleContract.self, from: Data(contentsOf: url))
        guard contract.contractVersion == supportedContract, contract.target == "coreml" else {
            throw DemoError("bundle.json (contract \(contract.contractVersion), \(contract.target)) is not for this app")
        }
        return contract
    }

    func prompt(_ user: String) -> String {
        promptTemplate.replacingOccurrences(of: "{prompt}", with: user)
            .replacingOccurrences(of: "{{", with: "{").replacingOccurrences(of: "}}", with: "}")
    }
}

struct DemoError: LocalizedError {
    let message: String
    init(_ message: String) { self.message = message }
    var errorDescription: String? { message }
}
